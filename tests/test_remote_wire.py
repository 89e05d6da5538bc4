"""The remote tunnel's wire format and identities (capsem_kernel/remote/wire.py, identity.py):
sans-IO, no sockets. Decoders are total: any input raises WireError or decodes."""

from __future__ import annotations

import json
import os
import pickle
import ssl
import struct

import pytest
from hypothesis import given, settings, strategies as st

from capsem_kernel.remote import identity, wire
from capsem_kernel.remote.identity import IdentityError, TlsIdentity

START = {"op": "start", "kernel_id": "k1", "key": "ab" * 16, "signature_scheme": "hmac-sha256",
         "policy": "[rules]\n", "folder": None, "cwd": "/", "env": {"A": "b"}, "extra": {"x": [1]}}
VALID = [START, {"op": "interrupt"}, {"op": "shutdown", "restart": True},
         {"op": "ready", "node": "n1", "info": {"pid": 3}}, {"op": "died", "reason": "gone"},
         {"op": "error", "code": "folder", "message": "m"}, {"op": "audit", "rows": [{"a": 1}]},
         {"op": "ping", "seq": 0}, {"op": "pong", "seq": 7},
         {"op": "signal", "signum": 2}, {"op": "info", "info": {}}, {"op": "stopped"},
         {"op": "barrier", "id": 1}, {"op": "barrier_done", "id": 1, "complete": False},
         {"op": "agent", "id": 2, "msg": {"op": "read"}}, {"op": "agent_reply", "id": 2, "reply": {}},
         {"op": "agent_error", "id": 2, "code": "c", "message": "m"}]


def test_every_op_has_a_valid_example():
    assert {m["op"] for m in VALID} == set(wire.OPS)


# ---- openings

@pytest.mark.parametrize("channel", wire.CHANNELS)
def test_channel_openings_round_trip_byte_by_byte(channel):
    data = wire.encode_open("channel", channel) + b"rest"
    assert len(data) == wire.OPEN_SIZE + 4
    d = wire.OpenDecoder()
    got = [d.feed(data[i:i + 1]) for i in range(wire.OPEN_SIZE)]
    assert got[:-1] == [None] * (wire.OPEN_SIZE - 1)
    assert got[-1] == wire.StreamOpen("channel", channel)
    assert wire.decode_open(data[:wire.OPEN_SIZE]) == wire.StreamOpen("channel", channel)


def test_control_opening_and_bad_openings():
    assert wire.decode_open(wire.encode_open("control")) == wire.StreamOpen("control")
    d = wire.OpenDecoder()
    assert d.feed(wire.encode_open("control") + b"xyz") == wire.StreamOpen("control")
    assert d.rest == b"xyz"
    for kind, channel in [("control", "shell"), ("channel", None), ("channel", "nope"),
                          ("other", None)]:
        with pytest.raises(wire.WireError):
            wire.encode_open(kind, channel)
    good = wire.encode_open("channel", "hb")
    for bad in [b"", good[:-1], good + b"x", b"GET / HTTP/1.1\r\n", b"\x16\x03\x01\x02\x00\x01\x00",
                good[:4] + b"\x02" + good[5:], good[:5] + b"\x02\x00", good[:6] + b"\x05",
                good[:5] + b"\x00\x01"]:
        with pytest.raises(wire.WireError):
            wire.decode_open(bad)


def test_open_decoder_rejects_a_wrong_prefix_at_once_and_stays_failed():
    d = wire.OpenDecoder()
    with pytest.raises(wire.WireError):
        d.feed(b"\x16")                       # a TLS ClientHello, or anything not ours
    with pytest.raises(wire.WireError):
        d.feed(wire.encode_open("control"))


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=64), st.integers(1, 9))
def test_open_decoder_is_total(data, step):
    d = wire.OpenDecoder()
    try:
        for i in range(0, len(data), step):
            if d.feed(data[i:i + step]) is not None:
                break
    except wire.WireError:
        return
    if d.done is not None:
        assert data[:4] == wire.MAGIC


# ---- control messages

@pytest.mark.parametrize("msg", VALID, ids=lambda m: m["op"])
def test_valid_messages_round_trip(msg):
    data = wire.encode_message(msg)
    assert wire.MessageDecoder().feed(data) == [msg]
    d = wire.MessageDecoder()
    out = []
    for b in data:
        out += d.feed(bytes([b]))
    assert out == [msg] and d.pending == 0


@pytest.mark.parametrize("bad", [
    [], "x", 3, None, {}, {"op": "nope"}, {"op": 1}, {"op": "interrupt", "x": 1},
    {"op": "shutdown"}, {"op": "shutdown", "restart": 1}, {"op": "ping", "seq": True},
    {"op": "ping", "seq": -1}, {"op": "ping", "seq": 2 ** 63}, {"op": "ping", "seq": 1.5},
    {**START, "key": "AB"}, {**START, "key": ""}, {**START, "key": "abc"}, {**START, "key": "zz"},
    {**START, "env": {"a": 1}}, {**START, "env": []}, {**START, "extra": []},
    {**START, "kernel_id": "x" * (wire.MAX_STR + 1)}, {**START, "policy": 3},
    {k: v for k, v in START.items() if k != "cwd"},
    {"op": "audit", "rows": [1]}, {"op": "audit", "rows": {}}, {"op": "ready", "node": "n", "info": None},
    {"op": "ready", "node": "n", "info": {"x": float("nan")}},
    {"op": "ready", "node": "n", "info": {"x": float("inf")}},
    {"op": "ready", "node": "n", "info": {1: "int key"}},
    {"op": "ready", "node": "n", "info": {"b": b"bytes"}},
    {"op": "ready", "node": "n", "info": {"deep": [[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[1]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]}},
    {"op": "audit", "rows": [{"big": "x" * wire.MAX_MESSAGE}]},
])
def test_invalid_messages_are_refused_by_encoder_and_decoder(bad):
    with pytest.raises(wire.WireError):
        wire.encode_message(bad)
    try:
        body = json.dumps(bad).encode()
    except (TypeError, ValueError):
        return
    if len(body) <= wire.MAX_MESSAGE and "int key" not in body.decode():  # json makes 1 -> "1"
        with pytest.raises(wire.WireError):
            wire.MessageDecoder().feed(struct.pack(">I", len(body)) + body)


@pytest.mark.parametrize("body", [
    b"", b"{", b"\xff\xfe", b'{"op":"interrupt","op":"interrupt"}', b'{"op":"ping","seq":NaN}',
    b'{"op":"ping","seq":Infinity}', b'{"op":"ready","node":"n","info":{"x":1e999}}',
    b"[" * 60000 + b"]" * 60000, b'{"op":"ping","seq":' + b"9" * 5000 + b"}",
    b'{"op":"interrupt"} x', b"\x00",
], ids=range(11))
def test_malformed_bodies_raise_wire_error(body):
    if len(body) > wire.MAX_MESSAGE:
        body = body[:wire.MAX_MESSAGE]
    with pytest.raises(wire.WireError):
        wire.MessageDecoder().feed(struct.pack(">I", len(body)) + body)


def test_oversized_length_is_refused_from_the_header_alone_and_the_decoder_stays_failed():
    d = wire.MessageDecoder()
    with pytest.raises(wire.WireError):
        d.feed(struct.pack(">I", wire.MAX_MESSAGE + 1))
    assert d.pending == 0
    with pytest.raises(wire.WireError):
        d.feed(wire.encode_message({"op": "interrupt"}))
    with pytest.raises(wire.WireError):
        wire.MessageDecoder().feed("not bytes")


def test_a_message_at_the_bound_passes_and_one_byte_more_does_not():
    base = {"op": "died", "reason": ""}
    # "reason" is bounded by MAX_STR: use audit rows to fill the body
    row = {"r": "x" * 100}
    msg = {"op": "audit", "rows": [row] * ((wire.MAX_MESSAGE - 100) // len(json.dumps(row)))}
    assert len(wire.encode_message(msg)) <= wire.MAX_MESSAGE + 4
    assert wire.MessageDecoder().feed(wire.encode_message(base)) == [base]
    body = json.dumps({"op": "audit", "rows": [{"r": "x" * wire.MAX_MESSAGE}]}).encode()
    with pytest.raises(wire.WireError):
        wire.MessageDecoder().feed(struct.pack(">I", len(body)) + body)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=20),
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=8), kids, max_size=4),
    max_leaves=20)


@settings(max_examples=400, deadline=None)
@given(st.dictionaries(st.sampled_from(["op", "seq", "node", "info", "rows", "key", "x", "restart"]),
                       json_values | st.sampled_from(list(wire.OPS)), max_size=5))
def test_encoder_and_decoder_agree_on_arbitrary_objects(obj):
    try:
        data = wire.encode_message(obj)
    except wire.WireError:
        return
    assert wire.MessageDecoder().feed(data) == [json.loads(data[4:])]


@settings(max_examples=1000, deadline=None)
@given(st.lists(st.binary(max_size=300), max_size=6),
       st.lists(st.sampled_from(VALID), max_size=3))
def test_message_decoder_is_total_and_bounded(chunks, valid):
    d = wire.MessageDecoder()
    stream = [wire.encode_message(m) for m in valid] + chunks
    try:
        for c in stream:
            d.feed(c)
            assert d.pending <= 4 + wire.MAX_MESSAGE
    except wire.WireError:
        pass


@settings(max_examples=300, deadline=None)
@given(st.integers(0, wire.MAX_MESSAGE), st.binary(max_size=200))
def test_message_decoder_with_any_announced_length(n, body):
    d = wire.MessageDecoder()
    try:
        out = d.feed(struct.pack(">I", n) + body)
    except wire.WireError:
        return
    if n > len(body):
        assert out == [] and d.pending == 4 + len(body)


# ---- identities

def test_identity_hides_and_refuses_to_ship_its_key():
    ident = TlsIdentity.generate("front-k1")
    assert b"PRIVATE KEY" in ident.key_pem
    assert ident.key_pem.decode() not in repr(ident) and "PRIVATE" not in str(ident)
    assert ident.fingerprint in repr(ident)
    for proto in range(pickle.HIGHEST_PROTOCOL + 1):
        with pytest.raises(TypeError):
            pickle.dumps(ident, protocol=proto)
    public = pickle.loads(pickle.dumps(ident.public()))
    assert public == {"cert_pem": ident.cert_pem, "fingerprint": ident.fingerprint}
    assert b"PRIVATE" not in pickle.dumps(ident.public())


def test_identities_are_p256_distinct_and_fingerprints_exact():
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec
    a, b = TlsIdentity.generate("a"), TlsIdentity.generate("a")
    assert a.fingerprint != b.fingerprint and a.cert_pem != b.cert_pem
    cert = x509.load_pem_x509_certificate(a.cert_pem)
    assert isinstance(cert.public_key(), ec.EllipticCurvePublicKey)
    assert cert.public_key().curve.name == "secp256r1"
    assert identity.fingerprint_of(a.cert_pem) == a.fingerprint
    assert identity.check_fingerprint(a.fingerprint) == a.fingerprint
    for bad in ["", a.fingerprint.upper(), a.fingerprint[:-1], a.fingerprint + "0", 3]:
        with pytest.raises(IdentityError):
            identity.check_fingerprint(bad)
    for bad in [b"", b"junk", a.key_pem, b"x" * (identity.MAX_PEM + 1), "str"]:
        with pytest.raises(IdentityError):
            identity.fingerprint_of(bad)


def test_contexts_are_tls13_only_with_the_peer_as_only_anchor_and_no_tickets():
    a, b = TlsIdentity.generate("a"), TlsIdentity.generate("b")
    for ctx in (identity.server_context(a, b.cert_pem), identity.client_context(a, b.cert_pem)):
        assert ctx.minimum_version == ctx.maximum_version == ssl.TLSVersion.TLSv1_3
        assert ctx.verify_mode == ssl.CERT_REQUIRED and not ctx.check_hostname
        assert ctx.options & ssl.OP_NO_TICKET
        assert ctx.cert_store_stats()["x509"] == 1          # the peer cert, nothing else
    assert identity.server_context(a, b.cert_pem).num_tickets == 0
    with pytest.raises(IdentityError):
        identity.server_context(a, b"not a cert")
    with pytest.raises(IdentityError):
        identity.client_context(a.public(), b.cert_pem)


def test_the_key_is_loaded_without_a_file_on_disk_and_also_where_there_is_no_memfd(monkeypatch, tmp_path):
    a, b = TlsIdentity.generate("a"), TlsIdentity.generate("b")
    monkeypatch.setattr(identity.tempfile, "tempdir", str(tmp_path))
    identity.server_context(a, b.cert_pem)
    assert list(tmp_path.iterdir()) == []                 # memfd: nothing written anywhere
    monkeypatch.delattr(identity.os, "memfd_create")
    made = []
    real = identity.tempfile.mkdtemp
    monkeypatch.setattr(identity.tempfile, "mkdtemp", lambda **kw: made.append(real(**kw)) or made[-1])
    ctx = identity.client_context(a, b.cert_pem)
    assert ctx.cert_store_stats()["x509"] == 1
    assert made and not any(os.path.exists(p) for p in made)   # the fallback file is gone at once
