"""Fuzzing and unit tests of the control protocol's framing and validators (capsem_agent.protocol)."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from capsem_agent import protocol
from capsem_agent.protocol import FrameDecoder, FrameError, MessageError

# what the protocol carries: integers of at most MAX_INT_DIGITS digits, finite floats
# (NaN/Infinity are not JSON: encode and decode refuse them, see test_hostile_json_*)
json_scalars = (st.none() | st.booleans()
                | st.integers(min_value=-(10**protocol.MAX_INT_DIGITS - 1), max_value=10**protocol.MAX_INT_DIGITS - 1)
                | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=50))
json_values = st.recursive(json_scalars, lambda kids: st.lists(kids, max_size=5)
                           | st.dictionaries(st.text(max_size=10), kids, max_size=5), max_leaves=20)
messages = st.fixed_dictionaries({"t": st.text(min_size=1, max_size=20)},
                                 optional={"id": st.integers(min_value=-(2**63), max_value=2**63 - 1), "data": json_values,
                                           "x": json_values})


def feed_all(decoder, data):
    return decoder.feed(data)


@given(st.binary(max_size=4096))
@settings(max_examples=500)
def test_arbitrary_bytes_only_raise_protocol_errors(data):
    dec = FrameDecoder()
    try:
        bodies = dec.feed(data)
    except FrameError:
        return
    for body in bodies:
        try:
            msg = protocol.decode_body(body)
        except MessageError:
            continue
        assert isinstance(msg, dict) and isinstance(msg["t"], str) and msg["t"]


@given(st.binary(max_size=2048))
@settings(max_examples=500)
def test_decode_body_arbitrary_bytes(body):
    try:
        msg = protocol.decode_body(body)
    except MessageError:
        return
    assert isinstance(msg["t"], str)


@given(st.lists(messages, min_size=1, max_size=8))
@settings(max_examples=300)
def test_encode_decode_round_trip(msgs):
    stream = b"".join(protocol.encode(m) for m in msgs)
    bodies = FrameDecoder().feed(stream)
    decoded = [protocol.decode_body(b) for b in bodies]
    assert decoded == [json.loads(json.dumps(m)) for m in msgs]


@given(st.lists(messages, min_size=1, max_size=5), st.data())
@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
def test_split_feeding_equals_whole_feeding(msgs, data):
    stream = b"".join(protocol.encode(m) for m in msgs)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=10)))
    dec = FrameDecoder()
    got = []
    prev = 0
    for c in cuts + [len(stream)]:
        got += dec.feed(stream[prev:c])
        prev = c
    assert got == FrameDecoder().feed(stream)
    assert dec.pending == 0


@given(st.binary(max_size=600), st.data())
@settings(max_examples=300)
def test_split_feeding_arbitrary_bytes_same_outcome(stream, data):
    """Any byte stream, cut anywhere: same bodies, and an error iff whole feeding errors."""
    def run(chunks):
        dec, out = FrameDecoder(max_frame=64), []
        try:
            for ch in chunks:
                out += dec.feed(ch)
        except FrameError as exc:
            return out + exc.bodies, True
        return out, False
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=8)))
    chunks, prev = [], 0
    for c in cuts + [len(stream)]:
        chunks.append(stream[prev:c])
        prev = c
    assert run(chunks) == run([stream])


@given(st.integers(protocol.MAX_FRAME + 1, 2**32 - 1))
def test_oversized_length_rejected_without_buffering(length):
    dec = FrameDecoder()
    with pytest.raises(FrameError):
        dec.feed(length.to_bytes(4, "big") + b"x" * 100)
    assert dec.broken
    with pytest.raises(FrameError):
        dec.feed(b"more")


def test_oversized_header_rejected_before_body_arrives():
    dec = FrameDecoder()
    assert dec.feed(b"\xff\xff") == []
    with pytest.raises(FrameError):
        dec.feed(b"\xff\xff")  # header complete: rejected at once, nothing of the body is awaited
    assert dec.pending <= protocol.HEADER.size


def test_frames_before_a_bad_header_are_not_lost():
    good = protocol.encode({"t": "a"}) + protocol.encode({"t": "b"})
    with pytest.raises(FrameError) as ei:
        FrameDecoder().feed(good + b"\xff\xff\xff\xff")
    assert [protocol.decode_body(b)["t"] for b in ei.value.bodies] == ["a", "b"]


def test_zero_length_rejected():
    with pytest.raises(FrameError):
        FrameDecoder().feed(b"\0\0\0\0")


def test_pending_is_bounded_by_one_frame():
    dec = FrameDecoder()
    frame = protocol.encode({"t": "x", "data": "a" * 1000})
    for i in range(len(frame) - 1):
        assert dec.feed(frame[i:i + 1]) == []
        assert dec.pending <= len(frame)
    assert len(dec.feed(frame[-1:])) == 1


def test_max_frame_boundary():
    body = b'{"t":"x","p":"' + b"a" * (protocol.MAX_FRAME - 16) + b'"}'
    assert len(body) == protocol.MAX_FRAME
    assert FrameDecoder().feed(len(body).to_bytes(4, "big") + body) == [body]
    with pytest.raises(FrameError):
        protocol.encode({"t": "x", "p": "a" * protocol.MAX_FRAME})


@pytest.mark.parametrize("body", [b"", b"\xff\xfe", b"[]", b"1", b'"t"', b"{}", b'{"t": ""}',
                                  b'{"t": 5}', b'{"t": "x", "id": "1"}', b'{"t": "x", "id": true}',
                                  b'{"t": "x", "id": 1.5}', b"[" * 100000, b'{"t":"x"'])
def test_decode_body_rejects(body):
    with pytest.raises(MessageError):
        protocol.decode_body(body)


def test_decode_body_keeps_id_for_error_replies():
    with pytest.raises(MessageError) as ei:
        protocol.decode_body(b'{"id": 7}')
    assert ei.value.msg_id == 7


# --- validators ----------------------------------------------------------------------------------

@given(json_values)
@settings(max_examples=300)
def test_validators_only_raise_message_error(value):
    msg = {"t": "x", "id": 1, "f": value}
    for fn in (lambda: protocol.req_str(msg, "f"), lambda: protocol.req_int(msg, "f"),
               lambda: protocol.req_bool(msg, "f"), lambda: protocol.req_str_list(msg, "f"),
               lambda: protocol.req_env(msg, "f"), lambda: protocol.req_data(msg, "f")):
        try:
            fn()
        except MessageError as exc:
            assert exc.msg_id == 1


def test_req_str():
    assert protocol.req_str({"a": "x"}, "a") == "x"
    assert protocol.req_str({}, "a", optional=True) is None
    for bad in ({}, {"a": 1}, {"a": "x\0y"}, {"a": "x" * (protocol.MAX_STRING + 1)}):
        with pytest.raises(MessageError):
            protocol.req_str(bad, "a")


def test_req_int():
    assert protocol.req_int({"a": 3}, "a", lo=0, hi=5) == 3
    for bad in ({"a": True}, {"a": 6}, {"a": "3"}, {"a": 3.0}, {}):
        with pytest.raises(MessageError):
            protocol.req_int(bad, "a", lo=0, hi=5)


def test_req_bool_and_lists_and_env_and_data():
    assert protocol.req_bool({}, "b") is False
    with pytest.raises(MessageError):
        protocol.req_bool({"b": 1}, "b")
    assert protocol.req_str_list({"v": ["a"]}, "v") == ["a"]
    for bad in ([], ["a", 1], "ab", ["a\0"]):
        with pytest.raises(MessageError):
            protocol.req_str_list({"v": bad}, "v")
    assert protocol.req_env({"env": {"A": "1"}}) == {"A": "1"}
    assert protocol.req_env({}) == {}
    for bad in ({"": "1"}, {"A=B": "1"}, {"A": 1}, {"A": "x\0"}, ["A"]):
        with pytest.raises(MessageError):
            protocol.req_env({"env": bad})
    assert protocol.req_data({"data": protocol.b64(b"\0\xff")}) == b"\0\xff"
    for bad in ("!!", "abc", 5):
        with pytest.raises(MessageError):
            protocol.req_data({"data": bad})


def test_error_helper_truncates():
    e = protocol.error("c", "m" * 10000, 3)
    assert e["id"] == 3 and len(e["message"]) == 4096 and e["t"] == "error"
    assert "id" not in protocol.error("c", "m")


# --- hostile JSON: every class that escaped or slipped through json.loads before -----------------
# (a guest controls these bytes: the host's decoder must answer MessageError, never anything else,
# and what it accepts must be writable again as UTF-8 JSON: logs, SQLite and sockets need that)

def _nest(depth: int, inner: str = "1") -> str:
    return "[" * depth + inner + "]" * depth


hostile_values = st.one_of(
    st.sampled_from([41, 4300, 4301, 20000]).map(lambda n: "9" * n),                # huge ints
    st.integers(min_value=41, max_value=5000).map(lambda n: "-" + "1" * n),
    st.sampled_from(["NaN", "Infinity", "-Infinity", "1e999", "-1e400", "1" + "0" * 400 + ".0"]),
    st.integers(min_value=33, max_value=100000).map(_nest),                          # deep nesting
    st.integers(min_value=33, max_value=3000).map(lambda n: '{"a":' * n + "1" + "}" * n),
    st.sampled_from(['"\\ud800"', '"\\udfff"', '"a\\udc00b"', '"\\ud83d"', '"\\ud83d\\ude00"']),
    st.text(max_size=20).map(json.dumps),
)
hostile_bodies = st.one_of(
    hostile_values.map(lambda v: f'{{"t":"out","id":1,"data":{v}}}'.encode()),
    hostile_values.map(lambda v: f'{{"t":"hello","v":1,"agent":{v},"boot":{{}}}}'.encode()),
    hostile_values.map(lambda v: f'{{"t":"ok","id":{v}}}'.encode()),
    st.sampled_from([b'{"t":"ok","t":"exit"}', b'{"t":"ok","id":1,"id":2}', b'{"t":"x","a":{"b":1,"b":2}}']),
    st.binary(max_size=64).map(lambda b: b'{"t":"out","data":"' + b + b'"}'),           # invalid UTF-8
    st.sampled_from([b'{"t":"\xed\xa0\x80"}', b'{"t":"\xc0\xaf"}', b'{"t":"\xff"}']),
)


@given(hostile_bodies)
@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_hostile_json_only_raises_message_error(body):
    try:
        msg = protocol.decode_body(body)
    except MessageError:
        return
    assert isinstance(msg, dict) and isinstance(msg["t"], str)
    protocol.encode(msg)  # accepted input can always be sent on / logged again
    json.dumps(msg, ensure_ascii=False).encode("utf-8")


@pytest.mark.parametrize("body", [
    b'{"t":"ok","id":' + b"9" * 5000 + b"}",        # escaped as ValueError (int digits limit) on main
    b'{"t":"out","data":' + b"1" * 50 + b"}",
    b'{"t":"ok","x":NaN}', b'{"t":"ok","x":Infinity}', b'{"t":"ok","x":-Infinity}', b'{"t":"ok","x":1e999}',
    b'{"t":"ok","x":' + b"[" * 40 + b"]" * 40 + b"}",
    b'{"t":"ok","x":' + b"[" * 200000 + b"]" * 200000 + b"}",
    b'{"t":"ok","x":"\\ud800"}', b'{"t":"\\udfff"}', b'{"t":"ok","\\ud800":1}',
    b'{"t":"ok","t":"exit"}', b'{"t":"ok","id":1,"id":2}',
], ids=lambda b: b[:40].decode(errors="replace"))
def test_hostile_json_is_refused(body):
    with pytest.raises(MessageError):
        protocol.decode_body(body)


def test_legal_edges_still_decode():
    assert protocol.decode_body(b'{"t":"ok","id":' + b"9" * 40 + b"}")["id"] == int("9" * 40)
    assert protocol.decode_body(b'{"t":"ok","x":' + b"[" * 32 + b"]" * 32 + b"}")["t"] == "ok"
    assert protocol.decode_body('{"t":"\\ud83d\\ude00"}'.encode())["t"] == "\U0001f600"  # a pair is fine
    assert protocol.decode_body(b'{"t":"ok","x":1.5e300}')["x"] == 1.5e300


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_encode_refuses_what_decode_refuses(value):
    with pytest.raises(FrameError):
        protocol.encode({"t": "x", "v": value})
