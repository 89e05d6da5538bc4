"""capsem_vm/qmp.py (qemu.qmp's QMPClient, one connection held per VM) and the QMP step of the
graceful stop (vm_base.py), against a real QEMU without a guest (`-machine none`: no image, no VM
boot, ~50 ms), plus a hostile QMP peer standing in for a QEMU that misbehaves."""

from __future__ import annotations

import asyncio
import json
import time

import pytest

from capsem_vm.config import VMConfig
from capsem_vm.errors import VMError
from capsem_vm.process import spawn
from capsem_vm.qmp import MAX_LINE, Monitor
from capsem_vm.vm import VM


@pytest.fixture
async def qemu(tmp_path):
    """QEMU with two QMP monitors, as qemu.py starts it (owner.sock, spare.sock in its cwd)."""
    proc = await spawn("qemu", ["qemu-system-x86_64", "-machine", "none", "-nodefaults", "-no-user-config",
                                "-nographic", "-display", "none",
                                "-qmp", "unix:owner.sock,server=on,wait=off",
                                "-qmp", "unix:spare.sock,server=on,wait=off"], cwd=tmp_path)
    deadline = time.monotonic() + 10
    while not (tmp_path / "spare.sock").exists():  # QEMU makes its sockets before it idles
        assert time.monotonic() < deadline and proc.alive(), "QEMU did not create its QMP sockets"
        await asyncio.sleep(0.01)
    yield proc, tmp_path
    await proc.stop(grace=3)


async def test_commands_answers_and_errors(qemu):
    _, d = qemu
    monitor = await Monitor.connect(str(d / "owner.sock"))
    try:
        assert (await monitor.execute("query-status"))["status"] == "running"
        with pytest.raises(VMError, match="QMP device_add failed"):
            await monitor.execute("device_add", {"driver": "no-such-device"})
        assert (await monitor.execute("query-status"))["status"] == "running"  # still usable
    finally:
        await monitor.close()


async def test_only_the_events_that_end_a_guest_are_kept_and_reported(qemu):
    """qemu.qmp queues and remembers every event its listener accepts: events a guest can cause
    over and over (here STOP/RESUME) must not grow the host's memory, and SHUTDOWN is reported."""
    proc, d = qemu
    seen: list[tuple[str, dict]] = []
    monitor = await Monitor.connect(str(d / "owner.sock"), on_event=lambda name, data: seen.append((name, dict(data))))
    try:
        for _ in range(200):
            await monitor.execute("stop")
            await monitor.execute("cont")
        assert seen == [] and monitor.client.events.history == () and monitor.client.events.empty()
        assert await monitor.quit()
        assert await asyncio.wait_for(proc.wait(), 5) == 0
        deadline = time.monotonic() + 5
        while not seen and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        assert seen == [("SHUTDOWN", {"guest": False, "reason": "host-qmp-quit"})]
        assert len(monitor.client.events.history) == 1
    finally:
        await monitor.close()  # QEMU is gone: closing still returns


async def test_the_spare_monitor_answers_while_the_owner_holds_its_own(qemu):
    """A QMP monitor serves one client at a time: the owner's held connection leaves the other
    monitor (a pooled VM's claimer, a person debugging) usable, and blocks a second client."""
    _, d = qemu
    owner = await Monitor.connect(str(d / "owner.sock"))
    try:
        spare = await Monitor.connect(str(d / "spare.sock"))
        try:
            assert (await spare.execute("query-status"))["status"] == "running"
        finally:
            await spare.close()
        with pytest.raises(VMError, match="could not connect"):
            await Monitor.connect(str(d / "owner.sock"), timeout=1)
        assert (await owner.execute("query-status"))["status"] == "running"
    finally:
        await owner.close()


async def test_graceful_stop_without_an_agent_asks_qemu_to_quit(qemu):
    """The shared graceful step (vm_base.VMBase._shut_down): no agent to power the guest off (a
    keeper's VM after the claim, a guest whose agent is gone), so QEMU is asked to quit over QMP
    instead of being signalled."""
    proc, d = qemu
    vm = VM(VMConfig())
    vm.qemu = proc
    await vm._open_monitor(d / "owner.sock")
    try:
        t = time.monotonic()
        await vm._shut_down(grace=10)
        assert not proc.alive() and proc.returncode == 0 and time.monotonic() - t < 3
        deadline = time.monotonic() + 5
        while vm.shutdown_reason is None and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        assert vm.shutdown_reason == "host-qmp-quit"
    finally:
        await vm._close_monitor()


async def _hostile_qmp(path, send_after_greeting: bytes, greeting: bytes | None = None):
    """A QMP server that greets (or not), negotiates and answers the first command with
    `send_after_greeting` (nothing: it hangs up)."""
    async def serve(reader, writer):
        writer.write(greeting if greeting is not None else
                     json.dumps({"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 7},
                                                     "package": ""}, "capabilities": []}}).encode() + b"\n")
        await writer.drain()
        request = await reader.read(1 << 16)  # qmp_capabilities
        if not request:
            return
        msg_id = json.loads(request).get("id")
        writer.write(json.dumps({"return": {}, "id": msg_id}).encode() + b"\n")
        await writer.drain()
        await reader.read(1 << 16)  # the command
        if not send_after_greeting:
            writer.close()  # hang up
            return
        writer.write(send_after_greeting)
        await writer.drain()
        await reader.read()

    return await asyncio.start_unix_server(serve, str(path), limit=1 << 24)


@pytest.mark.parametrize("reply", [
    b"x" * (MAX_LINE + 10),  # a line that never ends within the bound
    b"not json\n",
    b'{"return": {}, "id": "not-ours"}\n[1, 2]\n',
    b"",  # hangs up
], ids=["endless-line", "not-json", "not-an-object", "eof"])
async def test_a_misbehaving_qmp_peer_fails_the_command_and_nothing_else(tmp_path, reply):
    server = await _hostile_qmp(tmp_path / "q.sock", reply)
    try:
        monitor = await Monitor.connect(str(tmp_path / "q.sock"))
        try:
            with pytest.raises(VMError):
                await monitor.execute("query-status", timeout=5)
        finally:
            await monitor.close()
    finally:
        server.close()


@pytest.mark.parametrize("event", ["RESUME", "SHUTDOWN", "RTC_CHANGE"])
async def test_an_event_before_the_capabilities_answer_is_no_failure(tmp_path, event):
    """QEMU can emit an event between entering command mode and answering qmp_capabilities:
    connecting must not fail on it (it did, in CI under load), and later commands are answered."""
    ev = json.dumps({"event": event, "data": {}, "timestamp": {"seconds": 1, "microseconds": 0}}).encode() + b"\n"
    answer = b'{"return": {"status": "running"}, "id": "__ID__"}\n'
    server = await _echoing_qmp(tmp_path / "q.sock", before_capabilities_reply=ev, answer=answer)
    seen = []
    try:
        monitor = await Monitor.connect(str(tmp_path / "q.sock"), on_event=lambda n, d: seen.append(n), timeout=5)
        try:
            assert await monitor.execute("query-status", timeout=5) == {"status": "running"}
            await asyncio.sleep(0.05)
            assert seen == ([event] if event in ("SHUTDOWN", "RESET") else [])
        finally:
            await monitor.close()
    finally:
        server.close()


async def _echoing_qmp(path, before_capabilities_reply: bytes, answer: bytes):
    """A QMP server that puts `before_capabilities_reply` ahead of the capabilities answer, then
    answers each command with `answer` (its "__ID__" replaced by the command's id)."""
    async def serve(reader, writer):
        writer.write(json.dumps({"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 7},
                                                     "package": ""}, "capabilities": []}}).encode() + b"\n")
        await writer.drain()
        first = True
        while request := await reader.read(1 << 16):
            msg_id = json.loads(request).get("id")
            if first:
                writer.write(before_capabilities_reply + json.dumps({"return": {}, "id": msg_id}).encode() + b"\n")
                first = False
            else:
                writer.write(answer.replace(b"__ID__", str(msg_id).encode()))
            await writer.drain()

    return await asyncio.start_unix_server(serve, str(path), limit=1 << 24)


async def test_a_peer_that_does_not_greet_like_qemu_is_refused(tmp_path):
    server = await _hostile_qmp(tmp_path / "q.sock", b"", greeting=b'{"hello": 1}\n')
    try:
        with pytest.raises(VMError, match="could not connect"):
            await Monitor.connect(str(tmp_path / "q.sock"), timeout=5)
    finally:
        server.close()
