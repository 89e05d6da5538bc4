"""Supervision of the proxy service (issue 21, first item): a worker killed with SIGKILL mid-session
is replaced by its owner (the EgressRuntime's supervisor) within RECOVERY_BOUND, the kernel is
registered again with its policy and credential, and egress resumes without restarting anything;
streams in the gap are refused with code `proxy-restarting` and audited; a worker that keeps dying
is restarted with growing delays, and the state says so.

Real parts: the egress test world (egress_world.World: real HTTPS servers on 127.0.0.1, the real
mitmproxy service of the world's EgressRuntime, with two workers as on a 2-core host), a kernel's real Egress (policy file,
bridge) on Unix sockets standing in for its vsock ports, and the guest-protocol client.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from contextlib import asynccontextmanager

import pytest
from hypothesis import given, strategies as st

from egress_world import SECRET, SEEN, World
from proxy_helpers import FakeTransport, Guest

from capsem_vm.config import EgressConfig
from capsem_vm.egress import Egress
from capsem_vm.egress_runtime import EgressRuntime
from capsem_vm.proxy.supervisor import RestartBackoff, restart_delay

amark = pytest.mark.asyncio(loop_scope="module")
# the restart bound is issue 21's goal on a quiet machine: no second test worker beside it (make unit)
pytestmark = pytest.mark.serial
KID = "k-supervised"
RECOVERY_BOUND = 2.0  # seconds from SIGKILL to a request passing again (issue 21's goal)


# --- the back-off, sans-IO ------------------------------------------------------------------------

@given(st.lists(st.tuples(st.floats(0, 100), st.booleans()), max_size=40))
def test_restart_delays_are_bounded_and_never_a_tight_loop(events):
    """Any sequence of crashes (and starts that worked or failed, any time apart): every delay is
    within [0, cap]; an immediate restart only comes first in a streak, i.e. after a run of at
    least stable_after s; within a streak each delay is the previous one doubled (up to cap)."""
    b = RestartBackoff()
    now, last = 0.0, None
    for gap, start_worked in events:
        now += gap
        ran = b.started_at is not None and now - b.started_at >= b.stable_after
        delay = b.crashed(now)
        assert 0.0 <= delay <= b.cap
        if delay == 0.0:
            assert last is None or ran
        elif last is not None and not ran:
            assert delay == min(b.cap, max(b.base, 2 * last))
        last = delay
        now += delay
        if start_worked:
            b.started(now)


@given(st.integers(-5, 10_000))
def test_restart_delay_grows_and_is_capped(n):
    assert restart_delay(n) == (0.0 if n <= 1 else min(30.0, 0.5 * 2.0 ** min(n - 2, 64)))
    assert 0.0 <= restart_delay(n) <= restart_delay(n + 1) <= 30.0


# --- the real service -----------------------------------------------------------------------------

@asynccontextmanager
async def build_world(tmp_path_factory):
    """This module's `world` (conftest.py): the egress world and one kernel's Egress (the world's
    policy file: the test API allowed with /admin denied, a credential for secret.test.example)."""
    tmp = tmp_path_factory.mktemp("proxy-supervision")
    w = await World.create(tmp, service=False)
    w.runtime.service_options["workers"] = 2  # the Egress starts the service
    w.transport = FakeTransport(tmp)
    w.egress = Egress(EgressConfig(policy=str(w.policy_file), kernel_id=KID), runtime=w.runtime)
    await w.egress.start(w.transport)
    await w.egress._bridge()
    w.guest = Guest(w.transport.path(5002), w.transport.path(5003), str(tmp / "ca.pem"))
    (tmp / "ca.pem").write_text(w.egress._ca_pem)
    yield w
    await w.egress.close()
    await w.transport.close()
    await w.close()


def credentialed(w):
    """A request the policy allows and the credential applies to (the guest sends no secret)."""
    return asyncio.to_thread(w.guest.http, "GET", "secret.test.example", w.HTTPS, "/echo/sup", tls=True,
                             timeout=10)


def injected(r) -> bool:
    """The request passed and the upstream got the kernel's secret in the declared header (the
    response is scrubbed of it: look at what the server saw)."""
    return r.status == 200 and SEEN[-1]["path"] == "/echo/sup" and \
        SEEN[-1]["headers"].get("Authorization") == f"Bearer {SECRET}"


def worker_pids(w) -> list[int | None]:
    """Per worker slot: the pid of a serving worker, None while the slot is down."""
    return [wk.proc.pid if wk.proc is not None and wk.serving else None for wk in w.runtime.service.workers]


async def wait_serving(w, timeout: float) -> float:
    """Seconds until a credentialed request passes again (polled every 20 ms)."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        r = await credentialed(w)
        if r.reply.get("t") == "connected":
            return time.monotonic() - t0
        await asyncio.sleep(0.02)
    raise AssertionError(f"egress did not resume within {timeout} s: {w.runtime.proxy_state()}")


@amark
async def test_one_dead_worker_of_two_costs_no_request(world):
    """The bridge skips a worker that died (noticed or not) for one that serves; the dead one is
    replaced and both serve again."""
    w = world
    pids = worker_pids(w)
    assert None not in pids and len(pids) == 2
    os.kill(pids[0], signal.SIGKILL)
    for _ in range(6):  # spread over both slots: none is refused
        assert injected(await credentialed(w))
    t0 = time.monotonic()
    while None in worker_pids(w) or worker_pids(w)[0] == pids[0]:
        assert time.monotonic() - t0 < RECOVERY_BOUND, w.runtime.proxy_state()
        await asyncio.sleep(0.01)
    assert worker_pids(w)[1] == pids[1] and w.runtime.proxy_state()["serving"] == 2
    assert not w.rows(kernel=KID, code="proxy-restarting")


@amark
async def test_a_killed_service_is_replaced_and_the_kernel_keeps_its_policy_and_credential(world):
    """Every worker killed: the gap is refused (proxy-restarting, audited), then egress resumes
    within RECOVERY_BOUND with the kernel's credential and policy."""
    w = world
    assert injected(await credentialed(w))
    pids = worker_pids(w)
    restarts = w.runtime.proxy_state()["restarts"]

    t_kill = time.monotonic()
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    # the gap: an allowed stream is refused (fail closed) with the stable code, and audited
    s, gap = await asyncio.to_thread(w.guest.open, "secret.test.example", w.HTTPS, 5)
    s.close()
    assert gap["t"] == "refused" and gap["code"] == "proxy-restarting", gap
    assert gap["rule"] == "proxy-restarting" and "restarting" in gap["reason"]
    recovered = await wait_serving(w, 30)
    total = time.monotonic() - t_kill
    print(f"\nproxy worker SIGKILL -> a request passes again: {total:.3f} s "
          f"(supervisor: death noticed -> worker serving {w.runtime.proxy_state()['last_recovery_s']:.3f} s)")
    assert total <= RECOVERY_BOUND, w.runtime.proxy_state()
    assert recovered >= 0

    # same kernel, same bridge, new workers: the credential is injected, the policy applies
    while None in worker_pids(w):
        await asyncio.sleep(0.01)
    assert not set(worker_pids(w)) & set(pids)
    assert injected(await credentialed(w))
    admin = await asyncio.to_thread(w.guest.http, "GET", "api.test.example", w.HTTPS, "/admin/x", tls=True)
    assert admin.status == 403 and 'rule="admin"' in admin.policy
    s, other = await asyncio.to_thread(w.guest.open, "not-allowed.test.example", 443, 5)
    s.close()
    assert other["t"] == "refused" and other["code"] == "default-deny"

    rows = await asyncio.to_thread(w.wait_rows, kernel=KID, code="proxy-restarting")
    assert rows and rows[0]["decision"] == "deny" and rows[0]["host"] == "secret.test.example"
    state = w.egress.info()["proxy_service"]
    assert state["state"] == "running" and state["restarts"] == restarts + 2 and state["serving"] == 2
    assert state["last_exit"]["pid"] in pids and state["last_exit"]["returncode"] == -signal.SIGKILL
    assert await w.runtime.audit_barrier()


@amark
async def test_repeated_crashes_back_off_and_are_reported(world, caplog):
    """Kill worker 0 again as soon as each replacement serves: the restarts wait 0, 0.5, 1, 2 s
    (measured from each death to the replacement serving), the state shows the back-off while it
    waits, every death is logged, and egress resumes at the end (worker 1 serves meanwhile)."""
    w = world
    caplog.set_level(logging.WARNING, logger="capsem_vm.proxy.supervisor")
    sup = w.runtime.supervisor
    sup.backoffs[0].started_at -= sup.backoffs[0].stable_after  # the first kill follows a stable run
    gaps, seen_backoff = [], []
    for _ in range(4):
        pid = worker_pids(w)[0]
        t_kill = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        while worker_pids(w)[0] in (None, pid):
            st_ = w.runtime.proxy_state()
            if st_["state"] == "backoff":
                seen_backoff.append(st_["next_restart_in"])
            await asyncio.sleep(0.01)
        gaps.append(time.monotonic() - t_kill)
        await wait_serving(w, 60)
    print(f"\nkill -> replacement up, 4 kills in a row: {', '.join(f'{g:.2f} s' for g in gaps)}")
    assert gaps[0] <= RECOVERY_BOUND                 # restarted at once
    for want, got in zip((0.5, 1.0, 2.0), gaps[1:]):
        assert want <= got <= want + RECOVERY_BOUND  # backed off (the start itself takes ~0.4-1 s here)
    assert seen_backoff and max(seen_backoff) <= 2.0
    deaths = [r.getMessage() for r in caplog.records if "died: restarting it" in r.getMessage()]
    assert [d.split("restarting it ")[1].split(" (")[0] for d in deaths] == ["now", "in 0.5 s", "in 1.0 s", "in 2.0 s"]
    assert w.runtime.proxy_state()["restarts"] >= 4
    assert injected(await credentialed(w))


@amark
async def test_a_hung_worker_is_killed_and_replaced(world):
    """A worker that stops answering without dying (SIGSTOP here; a deadlock or a starved loop look
    the same from outside) still accepts connections nobody serves. The supervisor's ping goes
    unanswered, and the worker is SIGKILLed and replaced like a dead one; egress resumes with the
    kernel's credential. The pings run every 0.3 s with a 1.5 s timeout here (defaults 5 s / 10 s)."""
    w = world
    sup = w.runtime.supervisor
    saved = sup.ping_interval, sup.ping_timeout
    sup.ping_interval, sup.ping_timeout = 0.3, 1.5
    sup.backoffs[0].started_at -= sup.backoffs[0].stable_after  # a stable run before: restart at once
    hangs = sup.hangs
    try:
        await asyncio.sleep(saved[0] + 0.5)  # the watchdog's current sleep (default interval) ends
        pid = worker_pids(w)[0]
        t_stop = time.monotonic()
        os.kill(pid, signal.SIGSTOP)
        while worker_pids(w)[0] in (None, pid):
            assert time.monotonic() - t_stop < 15, w.runtime.proxy_state()
            await asyncio.sleep(0.02)
        replaced = time.monotonic() - t_stop
        print(f"\nproxy worker SIGSTOP -> replaced: {replaced:.2f} s (ping every 0.3 s, timeout 1.5 s)")
        assert 1.5 <= replaced <= 1.5 + 0.3 + RECOVERY_BOUND + 1.0
        assert not os.path.exists(f"/proc/{pid}")  # killed and reaped, not left stopped
        state = w.runtime.proxy_state()
        assert state["hangs"] == hangs + 1 and state["last_exit"]["pid"] == pid
        assert state["last_exit"]["returncode"] == -signal.SIGKILL
        await wait_serving(w, 30)
        assert injected(await credentialed(w))
        # and a worker that answers is never killed: two more rounds of pings, no new hang
        pids = worker_pids(w)
        await asyncio.sleep(1.0)
        assert worker_pids(w) == pids and sup.hangs == hangs + 1
    finally:
        sup.ping_interval, sup.ping_timeout = saved
        try:
            os.kill(pid, signal.SIGCONT)
        except ProcessLookupError:
            pass


async def test_a_worker_that_cannot_be_restarted_is_retried_with_back_off(tmp_path, monkeypatch):
    """The replacement fails to start (its interpreter is gone): retried with growing delays,
    the error is in the state, and the service is never replaced wholesale under its kernels."""
    monkeypatch.setenv("CAPSEM_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("CAPSEM_RUNTIME_DIR", str(tmp_path / "rt"))
    async with EgressRuntime(workers=1, log_path=tmp_path / "proxy.log") as rt:
        service = await rt.proxy()
        service.python = str(tmp_path / "gone" / "python")
        os.kill(service.pids[0], signal.SIGKILL)
        t0 = time.monotonic()
        while rt.proxy_state().get("last_error") is None or rt.proxy_state()["crashes_in_a_row"] < 3:
            assert time.monotonic() - t0 < 10, rt.proxy_state()
            await asyncio.sleep(0.02)
        state = rt.proxy_state()
        assert state["state"] in ("backoff", "restarting") and "gone" in state["last_error"]
        assert time.monotonic() - t0 >= 0.5  # the second attempt waited
        assert await rt.proxy() is service and not service.alive


@pytest.mark.parametrize("observe", [False, True])
def test_a_registration_sent_again_to_a_new_worker_keeps_the_kernels_observe_switch(observe):
    """A replaced worker gets each kernel's registration again: the observe switch (which may come
    from the kernel's config, not the file) must travel with it, or a restart would flip the mode."""
    import dataclasses
    from capsem_vm.policy import parse_policy
    from capsem_vm.proxy.service import _Registration
    policy = dataclasses.replace(parse_policy('[[rule]]\nname = "a"\nhost = "a.example"\naction = "allow"\n', "p.toml"),
                                 observe=observe)
    msg = _Registration(policy, "pw").message("k1")
    assert msg["observe"] is observe and msg["policy"] == policy.text and msg["password"] == "pw"
