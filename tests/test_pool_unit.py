"""Pool logic without VMs: the wire format (hypothesis), flavour matching, claim choice, refill
under a memory budget, seqpacket fd passing and peer credentials, control connection hand-over."""

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import given, settings, strategies as st

from capsem_agent import protocol
from capsem_vm.control import ControlConnection
from capsem_vm.errors import VMError
from capsem_vm.pool import seqpacket, wire

DIGEST = "ab" * 32
F = wire.Flavour(1024, 2, DIGEST, "tcg")

# integers the wire carries: at most 40 digits (decode refuses longer ones, see below)
json_values = st.recursive(st.none() | st.booleans() | st.integers(-(10**40 - 1), 10**40 - 1) | st.text(max_size=20),
                           lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4),
                           max_leaves=12)


@given(st.binary(max_size=2048))
def test_decode_arbitrary_bytes_only_raises_wire_error(data):
    try:
        msg = wire.decode(data)
    except wire.WireError:
        return
    assert isinstance(msg, dict) and msg["t"] in wire.TYPES


@pytest.mark.parametrize("body", [
    b'{"t":"claim","memory_mb":NaN}', b'{"t":"claim","memory_mb":Infinity}', b'{"t":"claim","x":1e999}',
    b'{"t":"claim","t":"stop"}', b'{"t":"claim","digest":"\\ud800"}', b'{"t":"claim","x":' + b"9" * 5000 + b"}",
    b'{"t":"claim","x":' + b"[" * 100 + b"]" * 100 + b"}",
], ids=lambda b: b[:32].decode(errors="replace"))
def test_decode_refuses_json_that_is_not_strict(body):
    """What json.loads lets through (NaN, duplicate keys, lone surrogates) or fails on in odd ways."""
    with pytest.raises(wire.WireError):
        wire.decode(body)


@given(st.sampled_from(sorted(wire.TYPES)), st.dictionaries(st.text(max_size=10).filter(lambda k: k != "t"),
                                                              json_values, max_size=5))
def test_encode_decode_roundtrip(t, rest):
    msg = {"t": t, **rest}
    assert wire.decode(wire.encode(msg)) == json.loads(json.dumps(msg))


def test_decode_refuses_oversize_unknown_and_non_objects():
    with pytest.raises(wire.WireError):
        wire.decode(b"x" * (wire.MAX_MESSAGE + 1))
    for bad in (b"", b"[1]", b'{"t": "rm -rf"}', b'{"t": 5}', b"\xff\xfe", b"{" * 100000):
        with pytest.raises(wire.WireError):
            wire.decode(bad)
    with pytest.raises(wire.WireError):
        wire.encode({"t": "claim", "pad": "x" * wire.MAX_MESSAGE})
    with pytest.raises(wire.WireError):
        wire.encode({"t": "nope"})


@given(json_values)
def test_flavour_from_wire_rejects_garbage(d):
    try:
        f = wire.Flavour.from_wire(d)
    except wire.WireError:
        return
    assert 256 <= f.memory_mb and 1 <= f.cpus <= 64 and len(f.image_digest) == 64


def test_flavour_roundtrip_and_bounds():
    assert wire.Flavour.from_wire(F.to_wire()) == F
    for bad in ({**F.to_wire(), "memory_mb": True}, {**F.to_wire(), "cpus": 0},
                {**F.to_wire(), "image_digest": "AB" * 32}, {**F.to_wire(), "accel": "hvf"},
                {**F.to_wire(), "memory_mb": "1024"}):
        with pytest.raises(wire.WireError):
            wire.Flavour.from_wire(bad)


def test_serves_needs_same_memory_cpus_image_and_compatible_accel():
    assert F.serves(wire.Flavour(1024, 2, DIGEST, "auto"))
    assert F.serves(wire.Flavour(1024, 2, DIGEST, "tcg"))
    assert not F.serves(wire.Flavour(1024, 2, DIGEST, "kvm"))
    assert not F.serves(wire.Flavour(2048, 2, DIGEST, "auto"))
    assert not F.serves(wire.Flavour(1024, 1, DIGEST, "auto"))
    assert not F.serves(wire.Flavour(1024, 2, "cd" * 32, "auto"))


def test_pick_oldest_ready_match_only():
    other = wire.Flavour(512, 1, DIGEST, "tcg")
    slots = [wire.Slot("booting", "booting", 0.0, None), wire.Slot("young", "ready", 5.0, F),
             wire.Slot("old", "ready", 1.0, F), wire.Slot("small", "ready", 0.5, other)]
    assert wire.pick(slots, wire.Flavour(1024, 2, DIGEST)) == "old"
    assert wire.pick(slots, wire.Flavour(512, 1, DIGEST)) == "small"
    assert wire.pick(slots, wire.Flavour(4096, 1, DIGEST)) is None
    assert wire.pick([], F) is None


shapes = st.lists(st.builds(wire.Shape, st.integers(256, 8192), st.integers(1, 8), st.integers(0, 20)),
                  min_size=1, max_size=4)


@given(shapes, st.data(), st.integers(0, 100000), st.integers(1, 8))
def test_plan_boots_respects_sizes_parallel_and_budget_and_is_maximal(shapes, data, budget, parallel):
    ready = data.draw(st.lists(st.integers(0, 20), min_size=len(shapes), max_size=len(shapes)))
    booting = data.draw(st.lists(st.integers(0, 20), min_size=len(shapes), max_size=len(shapes)))
    plan = wire.plan_boots(shapes, ready, booting, budget, parallel)
    if not plan:
        return
    counts = [r + b + plan.count(i) for i, (r, b) in enumerate(zip(ready, booting))]
    used = sum(c * s.memory_mb for c, s in zip(counts, shapes))
    assert all(plan.count(i) == 0 or counts[i] <= s.size for i, s in enumerate(shapes))
    assert sum(booting) + len(plan) <= parallel
    assert used <= budget
    # nothing more would fit: every flavour is full, or the budget or the parallel limit is reached
    assert sum(booting) + len(plan) == parallel or all(
        counts[i] >= s.size or used + s.memory_mb > budget for i, s in enumerate(shapes))


def test_plan_boots_examples():
    one = [wire.Shape(1024, 2, 4)]
    assert wire.plan_boots(one, [0], [0], 4096, 2) == [0, 0]
    assert wire.plan_boots(one, [2], [2], 4096, 2) == []
    assert wire.plan_boots(one, [3], [0], 4096, 2) == [0]
    assert wire.plan_boots(one, [0], [0], 2048, 8) == [0, 0]  # the budget caps it
    two = [wire.Shape(512, 1, 3), wire.Shape(2048, 2, 1)]
    assert wire.plan_boots(two, [0, 0], [0, 0], 3584, 2) == [0, 1]  # in turn: no flavour waits
    assert wire.plan_boots(two, [0, 0], [0, 0], 3584, 8) == [0, 1, 0, 0]
    assert wire.plan_boots(two, [0, 0], [0, 0], 2048, 8) == [0, 0, 0]  # 2048 MB would not fit beside them


@pytest.mark.parametrize("text, ok", [("2048,2,1", True), ("512,1,0", True), ("2048,2", False),
                                      ("a,b,c", False), ("128,1,1", False), ("2048,0,1", False),
                                      ("2048,2,-1", False), ("2048,2,1,", False), ("2048,2,1, ", False)])
def test_flavour_option_is_checked(text, ok):
    if ok:
        assert wire.Shape.parse(text) == wire.Shape(*map(int, text.split(",")))
    else:
        with pytest.raises(wire.WireError, match="flavour"):
            wire.Shape.parse(text)


def test_flavour_option_with_an_image_and_the_pools_image_for_the_others():
    from capsem_vm.errors import VMError
    from capsem_vm.pool.config import PoolConfig
    assert wire.Shape.parse("640,2,1,gpu-image") == wire.Shape(640, 2, 1, "gpu-image")
    assert wire.Shape.parse("640,2,1,/images/a,b") == wire.Shape(640, 2, 1, "/images/a,b")  # a dir may hold commas
    c = PoolConfig(size=2, memory_mb=512, cpus=1, image="main",
                   more=(wire.Shape(640, 2, 1), wire.Shape(512, 1, 1, "other")))
    assert c.shapes == (wire.Shape(512, 1, 2, "main"), wire.Shape(640, 2, 1, "main"), wire.Shape(512, 1, 1, "other"))
    assert c.budget == 2 * 512 + 640 + 512
    with pytest.raises(VMError, match="once"):  # the same memory, CPUs and image twice
        PoolConfig(size=1, memory_mb=512, cpus=1, image="main", more=(wire.Shape(512, 1, 1, "main"),))


def test_seqpacket_messages_fds_and_peer_uid():
    async def main():
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        a.setblocking(False), b.setblocking(False)
        r, w = os.pipe()
        await seqpacket.send(a, {"t": "vm", "x": 1}, fds=(r,))
        await seqpacket.send(a, {"t": "ok"})
        msg, fds = await seqpacket.recv(b, max_fds=1, timeout=5)
        assert msg == {"t": "vm", "x": 1} and len(fds) == 1
        os.write(w, b"hi")
        assert os.read(fds[0], 2) == b"hi"  # the same pipe, passed over
        msg2, fds2 = await seqpacket.recv(b, max_fds=1, timeout=5)
        assert msg2 == {"t": "ok"} and fds2 == []
        # unexpected fds are closed, not leaked
        await seqpacket.send(a, {"t": "ok"}, fds=(r, w))
        before = len(os.listdir("/proc/self/fd"))
        msg3, fds3 = await seqpacket.recv(b, max_fds=0, timeout=5)
        assert fds3 == [] and len(os.listdir("/proc/self/fd")) == before
        # garbage is a WireError; EOF is None
        a.send(b"\x00garbage")
        with pytest.raises(wire.WireError):
            await seqpacket.recv(b, timeout=5)
        assert seqpacket.peer_uid(b) == os.geteuid()
        with pytest.raises(asyncio.TimeoutError):
            await seqpacket.recv(b, timeout=0.2)
        a.close()
        assert await seqpacket.recv(b, timeout=5) == (None, [])
        for fd in (r, w, *fds):
            os.close(fd)
        b.close()
    asyncio.run(main())


def test_control_connection_hand_over_keeps_the_stream():
    """detach() gives a dup of the socket that another ControlConnection adopts; the peer sees
    one continuous stream. Refused while a request is pending or bytes are buffered."""
    async def main():
        host, guest = socket.socketpair()
        reader, writer = await asyncio.open_connection(sock=host)
        g_reader, g_writer = await asyncio.open_connection(sock=guest)
        g_writer.write(protocol.encode({"t": "hello", "v": protocol.PROTOCOL_VERSION, "agent": "t", "boot": {}}))
        first = ControlConnection(reader, writer)
        hello = await first.read_hello(timeout=5)
        fd = await first.detach()
        assert first.closed.is_set()
        r2, w2 = await asyncio.open_connection(sock=socket.socket(fileno=fd))
        second = ControlConnection(r2, w2)
        second.adopt(hello)
        req = asyncio.ensure_future(second.request({"t": "ping"}, timeout=5))
        dec = protocol.FrameDecoder()
        bodies = []
        while not bodies:
            bodies = dec.feed(await g_reader.read(4096))
        msg = protocol.decode_body(bodies[0])
        assert msg["t"] == "ping"
        g_writer.write(protocol.encode({"t": "pong", "id": msg["id"]}))
        assert (await req)["t"] == "pong"
        # busy: a request waits for its reply
        pending = asyncio.ensure_future(second.request({"t": "ping"}, timeout=5))
        await asyncio.sleep(0.05)
        with pytest.raises(VMError):
            await second.detach()
        pending.cancel()
        await second.close()
        g_writer.close()
    asyncio.run(main())


@given(st.integers(-5, 10000))
def test_backoff_grows_and_is_capped(n):
    assert wire.backoff(n) == (0.0 if n <= 0 else min(120.0, 2.0 ** min(n, 16)))
    assert 0 <= wire.backoff(n) <= 120 and wire.backoff(n) <= wire.backoff(n + 1)


# --- claims before refills (priority.py) --------------------------------------------------------

def _state(pid: int) -> str:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


def _wait_state(pid: int, want: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while _state(pid) != want:
        assert time.monotonic() < deadline, f"pid {pid} stayed {_state(pid)!r}, wanted {want!r}"
        time.sleep(0.02)


def test_boot_pause_stops_the_trees_under_the_keepers_then_continues_them():
    from capsem_vm.pool.priority import BootPause, descendants
    # a "keeper" with a busy "QEMU" child and a grandchild, like keeper -> qemu / helpers
    keeper = subprocess.Popen([sys.executable, "-c",
                               "import subprocess, sys, time\n"
                               "c = subprocess.Popen([sys.executable, '-c', 'import subprocess, sys; "
                               "subprocess.Popen([sys.executable, \"-c\", \"while True: pass\"]); "
                               "exec(\"while True: pass\")'])\n"
                               "time.sleep(60)"])
    try:
        deadline = time.monotonic() + 20
        while len(descendants(keeper.pid)) < 2:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        tree = descendants(keeper.pid)
        pause = BootPause(seconds=0.5)
        assert not pause.holds(keeper.pid) and pause.remaining_s() == 0
        pause.pause([keeper.pid])
        assert pause.paused == sorted(tree)
        assert pause.holds(keeper.pid) and not pause.holds(keeper.pid + 1) and 0 < pause.remaining_s() <= 0.5
        for pid in tree:
            _wait_state(pid, "T")
        assert _state(keeper.pid) != "T"  # the keeper itself keeps running
        assert pause.resume_if_due() is False  # not yet
        time.sleep(0.6)
        assert pause.resume_if_due() is True and pause.paused == []
        assert not pause.holds(keeper.pid) and pause.remaining_s() == 0
        for pid in tree:
            _wait_state(pid, "R")
    finally:
        for pid in descendants(keeper.pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        keeper.kill()
        keeper.wait()


def test_boot_pause_never_signals_a_process_that_ended():
    from capsem_vm.pool.priority import BootPause
    parent = subprocess.Popen([sys.executable, "-c", "import subprocess, sys, time\n"
                               "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
                               "time.sleep(60)"])
    try:
        from capsem_vm.pool.priority import descendants
        deadline = time.monotonic() + 20
        while not descendants(parent.pid):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        (child,) = descendants(parent.pid)
        pause = BootPause(seconds=0)
        pause.pause([parent.pid])
        os.kill(child, signal.SIGKILL)  # killing works on a stopped process
        pause.resume()  # its pidfd refers to the dead process: no error, nothing else signalled
        assert pause.paused == []
    finally:
        parent.kill()
        parent.wait()
