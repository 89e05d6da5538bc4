"""Sans-IO pieces of the egress path: DNS codec (fuzzed), DNS responder, synthetic pool,
secret scrubber, audit redaction. No processes, no sockets."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings, strategies as st

from capsem_vm.policy import parse_policy
from capsem_vm.proxy import dns
from capsem_vm.proxy.audit import AuditLog, read_events, redact_url
from capsem_vm.proxy.dns_responder import DnsResponder
from capsem_vm.proxy.scrub import Scrubber
from capsem_vm.proxy.synthetic import SyntheticPool

POLICY = parse_policy("""
[[rule]]
name = "pypi"
host = "pypi.org"
action = "allow"
[[rule]]
name = "corp"
host = "*.corp.test"
scheme = "https"
action = "allow"
[[rule]]
name = "blocked"
host = "bad.corp.test"
action = "deny"
""", "dns.toml")


# --- codec ------------------------------------------------------------------------------------

def test_roundtrip_a_query():
    q = dns.parse_query(dns.build_query("PyPI.org", dns.TYPE_A, qid=77))
    assert (q.id, q.name, q.qtype, q.qclass) == (77, "PyPI.org", dns.TYPE_A, dns.CLASS_IN)
    resp = dns.build_response(q, dns.NOERROR, ["198.18.0.1"], ttl=60)
    qid, rcode, ips = dns.parse_response(resp)
    assert (qid, rcode, ips) == (77, dns.NOERROR, ["198.18.0.1"])
    assert b"\x04PyPI\x03org" in resp  # question echoed verbatim (0x20 case randomization works)


@pytest.mark.parametrize("data,rcode", [
    (b"", None),                                                      # too short: drop
    (struct.pack(">HHHHHH", 1, 0x8000, 1, 0, 0, 0) + b"\x00\x00\x01\x00\x01", None),  # a response: drop
    (struct.pack(">HHHHHH", 1, 0x2800, 1, 0, 0, 0) + b"\x00\x00\x01\x00\x01", dns.NOTIMP),  # UPDATE
    (struct.pack(">HHHHHH", 1, 0x0100, 2, 0, 0, 0) + b"\x00\x00\x01\x00\x01", dns.FORMERR),  # 2 questions
    (struct.pack(">HHHHHH", 1, 0x0100, 1, 0, 0, 0) + b"\xc0\x0c\x00\x01\x00\x01", dns.FORMERR),  # pointer
    (struct.pack(">HHHHHH", 1, 0x0100, 1, 0, 0, 0) + b"\x05ab", dns.FORMERR),    # label past end
    (struct.pack(">HHHHHH", 1, 0x0100, 1, 0, 0, 0) + (b"\x3f" + b"a" * 63) * 5 + b"\x00\x00\x01\x00\x01",
     dns.FORMERR),                                                    # name > 255 bytes
    (dns.build_query("x.test") + b"\x00" * 2000, dns.FORMERR),       # oversized
])
def test_malformed_queries(data, rcode):
    with pytest.raises(dns.DnsParseError) as ei:
        dns.parse_query(data)
    if rcode is None:
        assert ei.value.qid is None
    else:
        assert ei.value.rcode == rcode
        assert ei.value.qid == struct.unpack(">H", data[:2])[0]


@settings(max_examples=2000)
@given(st.binary(max_size=600))
def test_parse_query_never_crashes(data):
    try:
        q = dns.parse_query(data)
    except dns.DnsParseError as exc:
        assert exc.rcode in (dns.FORMERR, dns.NOTIMP)
        return
    assert len(q.question) <= dns.MAX_QUERY
    assert len(q.name) <= 255


@settings(max_examples=1000)
@given(st.binary(min_size=12, max_size=300), st.integers(0, 0xFFFF))
def test_parse_query_on_mutated_valid_query(tail, qid):
    base = bytearray(dns.build_query("files.pythonhosted.org", dns.TYPE_AAAA, qid))
    for i, b in enumerate(tail[:len(base)]):
        if b % 7 == 0:
            base[i % len(base)] = b
    try:
        dns.parse_query(bytes(base) + tail[len(base):])
    except dns.DnsParseError:
        pass


@settings(max_examples=500)
@given(st.binary(max_size=600))
def test_responder_is_total_and_bounded(data):
    r = DnsResponder(POLICY, SyntheticPool(capacity=16), rate=1e9, burst=1e9)
    answer, event = r.answer(data, 0.0)
    if answer is not None:
        assert len(answer) <= len(data) + 64
        qid, rcode, ips = dns.parse_response(answer)
        assert all(ip.startswith("198.1") for ip in ips)


# --- responder ------------------------------------------------------------------------------------

def ask(r, name, qtype=dns.TYPE_A, now=0.0):
    answer, event = r.answer(dns.build_query(name, qtype), now)
    return dns.parse_response(answer)[1:], event


def test_responder_decisions():
    r = DnsResponder(POLICY, SyntheticPool())
    (rcode, ips), ev = ask(r, "pypi.org")
    assert rcode == dns.NOERROR and len(ips) == 1 and ips[0].startswith("198.18.")
    assert ev.decision == "allow" and ev.rule == "pypi" and ev.answer == ips[0]
    assert ask(r, "PYPI.ORG.")[0] == (dns.NOERROR, ips)            # same name, same address
    assert r.pool.name_for(ips[0]) == "pypi.org"
    assert ask(r, "pypi.org", dns.TYPE_AAAA)[0] == (dns.NOERROR, [])  # no IPv6
    assert ask(r, "pypi.org", 65)[0] == (dns.NOERROR, [])             # HTTPS RR: nothing
    (rcode, _), ev = ask(r, "evil.test")
    assert rcode == dns.NXDOMAIN and ev.decision == "deny" and ev.rule == "default"
    assert ask(r, "x.corp.test")[0][0] == dns.NOERROR                 # https-only rule: resolvable
    assert ask(r, "dns.google")[0][0] == dns.NXDOMAIN                 # DoH endpoint
    assert ask(r, "1.2.3.4")[0][0] == dns.NXDOMAIN
    assert ask(r, "a_b..c")[0][0] in (dns.NXDOMAIN, dns.FORMERR)


def test_responder_rate_limit():
    r = DnsResponder(POLICY, SyntheticPool(), rate=10, burst=5)
    codes = [ask(r, "pypi.org", now=0.0)[0][0] for _ in range(8)]
    assert codes == [dns.NOERROR] * 5 + [dns.REFUSED] * 3
    assert r.take_rate_limited() == 3
    assert ask(r, "pypi.org", now=1.0)[0][0] == dns.NOERROR           # refilled


def test_synthetic_pool_eviction_and_bounds():
    pool = SyntheticPool("198.18.0.0/30", capacity=100)
    assert pool.capacity == 2
    a, b = pool.address_for("a.test"), pool.address_for("b.test")
    assert {a, b} == {"198.18.0.1", "198.18.0.2"}
    pool.address_for("a.test")                   # a is now the most recently used
    c = pool.address_for("c.test")               # evicts b
    assert c == b and pool.name_for(c) == "c.test" and pool.name_for(a) == "a.test"
    assert pool.name_for("10.0.0.1") is None and pool.name_for("nonsense") is None
    assert len(pool) == 2


# --- scrubber and redaction -----------------------------------------------------------------------

@settings(max_examples=300)
@given(secret=st.binary(min_size=4, max_size=40).filter(lambda s: b"P" not in s),
       parts=st.lists(st.binary(max_size=50), max_size=8), cuts=st.lists(st.integers(0, 400), max_size=10))
def test_scrubber_never_leaks_across_chunks(secret, parts, cuts):
    body = secret.join(parts) + secret
    placeholder = b"P" * 8
    seen = []
    s = Scrubber([(secret, placeholder)], seen.append)
    bounds = sorted({0, len(body), *[c for c in cuts if c < len(body)]})
    out = b"".join(s(body[a:b]) for a, b in zip(bounds, bounds[1:])) + s(b"")
    assert secret not in out
    assert out == body.replace(secret, placeholder)
    assert sum(seen) == len(body)


def test_redact_url():
    assert redact_url("https://u:pw@x.test/p?q=1&api_key=abc&token=t&x=y") == \
        "https://x.test/p?q=1&api_key=REDACTED&token=REDACTED&x=y"
    assert "s3cr3t" not in redact_url("https://x.test/s3cr3t/a?v=s3cr3t", ["s3cr3t"])


def test_audit_log_roundtrip(tmp_path):
    db = tmp_path / "a" / "audit.sqlite3"
    log = AuditLog(db)
    log.record("k1", "dns", url="pypi.org", decision="allow", rule="pypi")
    log.record("k2", "http", method="GET", url="https://x/", status=403, decision="deny", rule="default")
    log.flush()
    rows = read_events(db)
    assert [(r["kernel"], r["kind"]) for r in rows] == [("k1", "dns"), ("k2", "http")]
    assert [r["kernel"] for r in read_events(db, kernel="k2")] == ["k2"]
    assert read_events(db, after_id=rows[-1]["id"]) == []
    assert oct(db.stat().st_mode & 0o777) == "0o600"
    with pytest.raises(TypeError):
        log.record("k1", "dns", colour="red")
    log.close()
