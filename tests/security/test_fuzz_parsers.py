"""Hypothesis against every host-side parser of guest data, driven through the real entry points:

- the host's control connection (capsem_vm/control.py over capsem_agent.protocol framing);
- the egress bridge: the first frame of a 5002 stream and the DNS frames of a 5003 stream
  (capsem_vm/proxy/bridge.py);
- the policy parser (capsem_vm/policy/loader.py; policies come from the host, but a bug here
  would be a bypass);
- the channel header the agent reads on 5001 (capsem_agent/relay.py, guest side, same framing).

Each property: hostile bytes only ever produce the documented errors, nothing is buffered beyond
the documented limits, and the stream is answered or closed (no hang, no crash). The ZMTP guard
of the channel forwarder is fuzzed in test_channel_guard.py, the DNS wire parser also in
tests/test_proxy_dns.py, the frame decoder in tests/test_protocol.py.
"""

from __future__ import annotations

import asyncio
import json
import socket
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from capsem_agent import protocol, relay
from capsem_vm.control import ControlConnection
from capsem_vm.errors import CapsemError, VMError
from capsem_vm.policy import PolicyError, parse_policy
from capsem_vm.proxy.bridge import EgressBridge

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

json_scalars = st.one_of(st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
                         st.floats(allow_nan=False), st.text(max_size=50))
json_values = st.recursive(json_scalars, lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4),
                           max_leaves=20)
types = st.sampled_from(["hello", "ok", "error", "pong", "started", "out", "exit", "kernel_exit", "zz", "", None, 7])
messages = st.fixed_dictionaries({"t": types}, optional={
    "id": st.one_of(st.integers(min_value=-5, max_value=5), st.text(max_size=3), st.booleans()),
    "v": st.integers(min_value=0, max_value=3), "agent": json_values, "boot": json_values,
    "data": st.one_of(st.text(max_size=20), st.integers()), "fd": json_values, "code": json_values,
    "signal": json_values, "pid": json_values})


def _frame(body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + body


# JSON that json.loads mishandles: huge integers (ValueError from the int-digits limit), NaN and
# Infinity, floats that overflow, deep nesting, lone surrogates, duplicate keys, invalid UTF-8
hostile_values = st.one_of(
    st.sampled_from([41, 4301, 5000, 20000]).map(lambda n: "9" * n),  # > 4300: ValueError in json
    st.sampled_from(["NaN", "Infinity", "-Infinity", "1e999", "-1e400"]),
    st.integers(min_value=33, max_value=50000).map(lambda n: "[" * n + "]" * n),
    st.sampled_from(['"\\ud800"', '"a\\udfffb"', '"\\u001b[2J\\r\\nforged"', '"\\u202eevil"']),
)
hostile_json = st.one_of(
    st.tuples(st.sampled_from(["id", "v", "pid", "code", "signal", "data", "fd", "boot", "agent", "host", "port"]),
              st.sampled_from(["hello", "ok", "out", "exit", "kernel_exit", "connect", "dns"]), hostile_values)
    .map(lambda x: f'{{"t":"{x[1]}","{x[0]}":{x[2]}}}'),
    st.sampled_from(['{"t":"ok","t":"exit"}', '{"t":"ok","id":1,"id":2}', '{"t":"connect","host":"a","host":"b"}']),
).map(lambda text: _frame(text.encode())) | st.binary(max_size=32).map(lambda b: _frame(b'{"t":"' + b + b'"}'))

chunks = st.one_of(
    hostile_json,
    messages.map(lambda m: _frame(json.dumps(m).encode())),
    st.binary(max_size=64).map(_frame),                              # framed garbage
    st.binary(max_size=32),                                           # unframed garbage
    st.sampled_from([b"\xff\xff\xff\xff", b"\x00\x00\x00\x00", struct.pack(">I", protocol.MAX_FRAME + 1)]),
)


def _reader(data: bytes) -> asyncio.StreamReader:
    r = asyncio.StreamReader()
    r.feed_data(data)
    r.feed_eof()
    return r


class _Writer:
    def __init__(self):
        self.data = bytearray()
        self.closed = False
        self.eof = False

    def write(self, b):
        self.data += b

    async def drain(self):
        pass

    def close(self):
        self.closed = True

    def is_closing(self):
        return self.closed

    def can_write_eof(self):
        return True

    def write_eof(self):
        self.eof = True


async def _control_session(data: bytes):
    conn = ControlConnection(_reader(data), _Writer())
    events = []
    conn.on_event = events.append
    try:
        hello = await asyncio.wait_for(conn.read_hello(timeout=5), 10)
    except (CapsemError, protocol.FrameError, protocol.MessageError, asyncio.TimeoutError):
        await conn.close()
        return "rejected", conn
    assert hello["t"] == "hello"
    pending = asyncio.ensure_future(conn.request({"t": "ping"}, timeout=5))
    await asyncio.wait_for(conn.closed.wait(), 10)  # EOF after the data: the reader always ends
    task = conn._reader_task
    await asyncio.wait_for(asyncio.shield(task), 5)
    assert task.exception() is None  # guest bytes never escape the reader as an uncaught exception
    with pytest.raises(VMError):  # failed at once by the reader's end, never left to time out
        await asyncio.wait_for(pending, 1)
    assert conn._decoder.pending <= protocol.MAX_FRAME + protocol.HEADER.size
    await conn.close()
    return "served", conn


@SETTINGS
@given(st.lists(chunks, max_size=12))
def test_control_connection_survives_any_guest_bytes(parts):
    asyncio.run(_control_session(b"".join(parts)))


@SETTINGS
@given(st.lists(chunks, max_size=12))
def test_control_connection_after_a_valid_hello(parts):
    hello = _frame(json.dumps({"t": "hello", "v": protocol.PROTOCOL_VERSION, "agent": "x",
                               "boot": {}}).encode())
    outcome, conn = asyncio.run(_control_session(hello + b"".join(parts)))
    # a bad header arriving in the same read as the hello fails the whole connection (closed)
    assert outcome in ("served", "rejected") and conn.closed.is_set()


# --- egress bridge -----------------------------------------------------------------------------

DENY_ALL = parse_policy("", "<fuzz: deny all>")


class _NoProxy:
    """The bridge must never reach the proxy for a deny-all policy."""
    host = "127.0.0.1"
    ports = [1]
    username = password = "x"


connect_frames = st.one_of(
    st.fixed_dictionaries({"t": st.sampled_from(["connect", "dns", "x"]),
                           "host": st.one_of(st.text(max_size=300), st.integers(), st.none()),
                           "port": st.one_of(st.integers(min_value=-10, max_value=70000), st.text(max_size=5))})
    .map(lambda m: _frame(json.dumps(m).encode())),
    st.binary(max_size=80),
    st.binary(max_size=40).map(_frame),
    st.just(struct.pack(">I", 5000) + b"{" * 5000),
    hostile_json,
)


@SETTINGS
@given(connect_frames, st.binary(max_size=100))
def test_egress_first_frame_is_always_refused_or_dropped_under_deny_all(first, tail):
    async def go():
        bridge = EgressBridge("fuzz", DENY_ALL, _NoProxy(), audit=None, first_frame_timeout=2)
        w = _Writer()
        await asyncio.wait_for(bridge.handle_egress(_reader(first + tail), w), 10)
        assert w.closed
        if w.data:
            dec = protocol.FrameDecoder()
            (body,) = dec.feed(bytes(w.data))
            assert protocol.decode_body(body)["t"] == "refused"
        assert bridge._streams == 0
    asyncio.run(go())


dns_frames = st.one_of(
    st.binary(max_size=120).map(lambda q: _frame(json.dumps({"t": "dns", "data": protocol.b64(q)}).encode())),
    st.fixed_dictionaries({"t": st.sampled_from(["dns", "connect"]), "data": st.one_of(st.text(max_size=20), st.integers())})
    .map(lambda m: _frame(json.dumps(m).encode())),
    st.binary(max_size=40),
    st.just(struct.pack(">I", 9000) + b"x" * 9000),
    hostile_json,
)


@SETTINGS
@given(st.lists(dns_frames, max_size=8))
def test_dns_stream_answers_in_order_or_closes(frames):
    async def go():
        bridge = EgressBridge("fuzz", DENY_ALL, _NoProxy(), audit=None)
        w = _Writer()
        await asyncio.wait_for(bridge.handle_dns(_reader(b"".join(frames)), w), 10)
        assert w.closed
        replies = [protocol.decode_body(b) for b in protocol.FrameDecoder().feed(bytes(w.data))]
        assert all(r["t"] in ("dns", "error") for r in replies)
        assert len(replies) <= len(frames)
        assert bridge._dns_streams == 0
    asyncio.run(go())


async def test_dns_streams_per_vm_are_capped():
    bridge = EgressBridge("fuzz", DENY_ALL, _NoProxy(), audit=None, max_dns_streams=2)
    held = [asyncio.StreamReader() for _ in range(2)]
    tasks = [asyncio.ensure_future(bridge.handle_dns(r, _Writer())) for r in held]
    await asyncio.sleep(0.05)
    w = _Writer()
    await asyncio.wait_for(bridge.handle_dns(asyncio.StreamReader(), w), 5)  # refused at once
    assert w.closed and bridge._dns_streams == 2
    for r in held:
        r.feed_eof()
    await asyncio.gather(*tasks)
    assert bridge._dns_streams == 0


async def test_egress_streams_per_vm_are_capped():
    bridge = EgressBridge("fuzz", DENY_ALL, _NoProxy(), audit=None, max_streams=1, first_frame_timeout=30)
    held = asyncio.StreamReader()
    task = asyncio.ensure_future(bridge.handle_egress(held, _Writer()))
    await asyncio.sleep(0.05)
    w = _Writer()
    refused = asyncio.StreamReader()
    refused.feed_eof()  # the guest closes once it has read the refusal
    await asyncio.wait_for(bridge.handle_egress(refused, w), 10)
    reply = protocol.decode_body(protocol.FrameDecoder().feed(bytes(w.data))[0])
    assert reply == {"t": "refused", "reason": "too many concurrent connections from this VM", "rule": "limit",
                     "code": "limit"}
    assert w.eof and w.closed  # EOF first, then closed (hang_up)
    held.feed_eof()
    await task


# --- policy ------------------------------------------------------------------------------------

toml_keys = st.sampled_from(["name", "host", "action", "port", "scheme", "methods", "paths", "reason",
                             "addresses", "include", "allow_doh", "env", "file", "placeholder", "hosts", "header",
                             "format", "query", "x"])
toml_values = st.one_of(st.text(max_size=20).map(json.dumps), st.integers(min_value=-5, max_value=70000).map(str),
                        st.lists(st.text(max_size=8), max_size=3).map(json.dumps), st.sampled_from(["true", '"*"', '"allow"', '"deny"']))
policy_texts = st.one_of(
    st.text(max_size=300),
    st.lists(st.tuples(st.sampled_from(["[[rule]]", "[[credential]]", "[settings]", ""]),
                       st.lists(st.tuples(toml_keys, toml_values), max_size=6)), max_size=4)
    .map(lambda sections: "\n".join(h + "\n" + "\n".join(f"{k} = {v}" for k, v in kv) for h, kv in sections)),
)


@SETTINGS
@given(policy_texts)
def test_policy_parser_only_raises_policy_errors(text):
    try:
        policy = parse_policy(text, "fuzz.toml")
    except PolicyError as exc:
        assert "fuzz.toml" in str(exc)
        return
    for url in ("http://example.com/", "https://169.254.169.254/latest", "http://127.0.0.1:8888/api"):
        decision = policy.decide("GET", url)
        assert decision.action in ("allow", "deny")


# --- the channel header (agent side, the same framing) ---------------------------------------------

@SETTINGS
@given(st.one_of(st.binary(max_size=100), chunks))
def test_channel_header_parser_only_raises_protocol_errors(data):
    a, b = socket.socketpair()
    try:
        a.sendall(data)
        a.shutdown(socket.SHUT_WR)
        b.settimeout(2)
        try:
            name, prime = relay.read_channel_frame(b)
        except (protocol.FrameError, protocol.MessageError, EOFError, socket.timeout):
            return
        assert name in protocol.KERNEL_CHANNELS and isinstance(prime, bool)
    finally:
        a.close()
        b.close()
