"""The one frame reader (capsem_agent.protocol): FrameDecoder.wanted() drives exact reads, and
recv_message (blocking sockets) / read_message (asyncio) read one message each, never a byte past
it. Used by the bridge, the proxy service, the guest relay and the guest's egress streams."""

from __future__ import annotations

import asyncio
import socket

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from capsem_agent import protocol
from capsem_agent.protocol import FrameDecoder, FrameError, MessageError

names = st.text(st.characters(min_codepoint=32, max_codepoint=0x2FFF), min_size=1, max_size=30)
messages = st.fixed_dictionaries({"t": names}, optional={"id": st.integers(0, 2**40), "x": names})
SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def exact_reads(stream: bytes, caps: list[int], max_len: int, count: int):
    """What recv_message does, on a byte string: each read asks wanted() and gets at most that
    (and at most the next cap: a socket may return less). Returns (messages, outcome, consumed),
    outcome None or the exception class that ended reading."""
    pos, out, caps = 0, [], list(caps)
    try:
        for _ in range(count):
            dec = FrameDecoder(max_len)
            while True:
                want = dec.wanted()
                assert want > 0
                cap = caps.pop(0) if caps else want
                data = stream[pos:pos + min(want, max(cap, 1))]
                if not data:
                    raise EOFError
                pos += len(data)
                if bodies := dec.feed(data):
                    assert len(bodies) == 1
                    out.append(protocol.decode_body(bodies[0]))
                    break
    except (EOFError, FrameError, MessageError) as exc:
        return out, type(exc), pos
    return out, None, pos


@SETTINGS
@given(st.lists(messages, min_size=1, max_size=5), st.binary(max_size=64),
       st.lists(st.integers(1, 40), max_size=30))
def test_exact_reads_give_every_frame_and_leave_what_follows(msgs, tail, caps):
    frames = b"".join(protocol.encode(m) for m in msgs)
    got, outcome, consumed = exact_reads(frames + tail, caps, protocol.MAX_FRAME, len(msgs))
    assert outcome is None and consumed == len(frames)
    assert got == [protocol.decode_body(b) for b in FrameDecoder().feed(frames)]


@SETTINGS
@given(st.binary(max_size=300), st.lists(st.integers(1, 40), max_size=30), st.lists(st.integers(1, 40), max_size=30))
def test_any_bytes_any_split_same_outcome(stream, caps_a, caps_b):
    """Any bytes, read in any pieces: the same messages and the same refusal (EOFError for a
    truncated frame, FrameError for a bad length, MessageError for a bad body)."""
    a = exact_reads(stream, caps_a, 64, 10)
    b = exact_reads(stream, caps_b, 64, 10)
    assert a == b


@given(st.integers(65, 2**32 - 1), st.binary(max_size=100))
def test_oversize_is_refused_on_its_header_without_reading_the_body(length, rest):
    stream = length.to_bytes(4, "big") + rest
    assert exact_reads(stream, [], 64, 1) == ([], FrameError, 4)


@given(st.lists(messages, min_size=1, max_size=3), st.data())
def test_truncated_frames_end_in_eof(msgs, data):
    frames = b"".join(protocol.encode(m) for m in msgs)
    cut = data.draw(st.integers(0, len(frames) - 1))
    got, outcome, consumed = exact_reads(frames[:cut], [], protocol.MAX_FRAME, len(msgs))
    assert outcome is EOFError and len(got) < len(msgs) and consumed == cut


def test_wanted_asks_for_the_header_then_the_body():
    dec = FrameDecoder()
    assert dec.wanted() == 4
    frame = protocol.encode({"t": "x"})
    assert dec.feed(frame[:2]) == [] and dec.wanted() == 2
    assert dec.feed(frame[2:5]) == [] and dec.wanted() == len(frame) - 5
    assert dec.feed(frame[5:]) == [frame[4:]] and dec.wanted() == 4


# --- the thin readers over real streams -----------------------------------------------------------

def _pair(data: bytes, eof: bool = True):
    a, b = socket.socketpair()
    a.sendall(data)
    if eof:
        a.shutdown(socket.SHUT_WR)
    b.settimeout(5)
    return a, b


def test_recv_message_reads_exactly_one_frame():
    a, b = _pair(protocol.encode({"t": "connect", "port": 1}) + b"raw bytes", eof=True)
    try:
        assert protocol.recv_message(b, 4096) == {"t": "connect", "port": 1}
        assert b.recv(100) == b"raw bytes"
    finally:
        a.close()
        b.close()


@pytest.mark.parametrize("data, error", [
    (b"\x00\x00\x10\x01" + b"x" * 10, FrameError),  # 4097 > 4096: refused on the header
    (b"\x00\x00\x00\x00", FrameError),
    (b"\x00\x00\x00\x05{\"t\"", EOFError),
    (b"\x00\x00", EOFError),
    (b"", EOFError),
    (b"\x00\x00\x00\x02[]", MessageError),
])
def test_recv_message_refuses_cleanly(data, error):
    a, b = _pair(data)
    try:
        with pytest.raises(error):
            protocol.recv_message(b, 4096)
        if error is FrameError and data[4:]:
            assert b.recv(100) == data[4:]  # nothing of the refused body was read
    finally:
        a.close()
        b.close()


def test_recv_message_times_out_as_oserror():
    a, b = _pair(b"\x00\x00", eof=False)
    b.settimeout(0.05)
    try:
        with pytest.raises(OSError):
            protocol.recv_message(b)
    finally:
        a.close()
        b.close()


@SETTINGS
@given(st.lists(messages, min_size=1, max_size=4), st.binary(max_size=32), st.data())
def test_read_message_over_any_arrival_split(msgs, tail, data):
    stream = b"".join(protocol.encode(m) for m in msgs) + tail
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=8)))

    async def main():
        reader = asyncio.StreamReader()

        async def arrive():
            prev = 0
            for c in cuts + [len(stream)]:
                reader.feed_data(stream[prev:c])
                prev = c
                await asyncio.sleep(0)
            reader.feed_eof()
        feeder = asyncio.ensure_future(arrive())
        got = [await protocol.read_message(reader) for _ in msgs]
        await feeder
        return got, await reader.read()
    got, rest = asyncio.run(main())
    assert got == [protocol.decode_body(b) for b in FrameDecoder().feed(stream[:len(stream) - len(tail)])]
    assert rest == tail


@pytest.mark.parametrize("data, error", [
    (b"\x00\x10\x00\x01", FrameError), (b"\x00\x00\x00\x09{}", EOFError), (b"\x00\x00\x00\x02{}", MessageError),
])
def test_read_message_refuses_cleanly(data, error):
    async def main():
        reader = asyncio.StreamReader()
        reader.feed_data(data)
        reader.feed_eof()
        with pytest.raises(error):
            await protocol.read_message(reader)
    asyncio.run(main())
    assert issubclass(asyncio.IncompleteReadError, EOFError)  # what read_message's EOF is
