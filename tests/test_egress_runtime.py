"""capsem_vm.egress_runtime: who uses the proxy service and when it stops, the audit log it owns,
and the process-wide accessor provisioners use. Real proxy service (one worker), no VM."""

from __future__ import annotations

import asyncio

import pytest

from capsem_vm.egress_runtime import EgressRuntime, process_runtime, set_process_runtime
from capsem_vm.proxy.service import ProxyServiceError


@pytest.fixture
def dirs(tmp_path, monkeypatch):
    monkeypatch.setenv("CAPSEM_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("CAPSEM_RUNTIME_DIR", str(tmp_path / "rt"))
    return tmp_path


def test_the_process_runtime_is_made_once_and_an_owner_can_install_its_own():
    before = set_process_runtime(None)
    try:
        made = process_runtime()
        assert process_runtime() is made
        own = EgressRuntime()
        assert set_process_runtime(own) is made and process_runtime() is own
        assert set_process_runtime(None) is own
        assert process_runtime() is not own  # a fresh one on next use
    finally:
        set_process_runtime(before)


async def test_the_service_stops_only_after_the_last_user_and_its_idle_time(dirs):
    async with EgressRuntime(idle=0.3, workers=1, log_path=dirs / "proxy.log") as rt:
        a = await rt.acquire()
        b = await rt.acquire()
        assert a is b and a.alive and rt.users == 2
        rt.release()
        await asyncio.sleep(0.6)
        assert rt.service is a and a.alive  # one user left
        rt.release()
        c = await rt.acquire()  # back within the idle time: the timer is off, same service
        await asyncio.sleep(0.6)
        assert c is a and a.alive
        rt.release()
        for _ in range(50):
            if rt.service is None:
                break
            await asyncio.sleep(0.1)
        assert rt.service is None and not a.alive and rt.users == 0
        assert await rt.audit_barrier()  # nothing left to write
        again = await rt.proxy()  # started again on demand
        assert again is not a and again.alive
    assert rt.service is None and not again.alive  # close stops it


async def test_release_service_keeps_a_service_in_use_and_close_stops_it_anyway(dirs):
    rt = EgressRuntime(workers=1, log_path=dirs / "proxy.log")
    service = await rt.acquire()
    await rt.release_service()
    assert rt.service is service and service.alive
    rt.audit.record("k-rt", "dns", host="x.example", decision="deny", code="default-deny")
    await rt.close()
    assert rt.service is None and not service.alive
    from capsem_vm.proxy import read_events
    assert [r["host"] for r in read_events(dirs / "data" / "audit.sqlite3", kernel="k-rt")] == ["x.example"]


async def test_a_service_that_cannot_start_counts_no_user(dirs):
    rt = EgressRuntime(python=str(dirs / "no-such-python"))
    with pytest.raises(ProxyServiceError):
        await rt.acquire()
    assert rt.users == 0 and rt.service is None
    await rt.close()
