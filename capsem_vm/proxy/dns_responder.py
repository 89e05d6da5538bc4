"""The host's answer to guest DNS: policy decides, the synthetic pool supplies addresses.

Sans-IO: `answer(query_bytes, now)` returns the reply bytes (or None: drop) and an audit record.
Rate-bounded with a token bucket so a guest cannot turn DNS into a CPU or audit-log flood.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..policy import Policy
from ..policy.match import normalize_host, parse_ip
from ..rate import TokenBucket
from . import dns
from .synthetic import SyntheticPool


@dataclass
class DnsEvent:
    """What to audit for one query (None fields are unknown)."""
    name: str
    qtype: str
    decision: str      # allow | would-deny (observe mode) | deny | refused | error
    rule: str
    reason: str
    rcode: int
    answer: str | None = None
    code: str = ""     # stable reason code (capsem_vm.policy.codes)


class DnsResponder:
    def __init__(self, policy: Policy, pool: SyntheticPool | None = None, *,
                 rate: float = 100.0, burst: float = 200.0, ttl: int = 300):
        self.policy = policy
        self.pool = pool if pool is not None else SyntheticPool()
        self.bucket = TokenBucket(rate, burst)
        self.ttl = ttl
        self.rate_limited = 0  # queries refused for rate since the last audited one

    def answer(self, data: bytes, now: float) -> tuple[bytes | None, DnsEvent | None]:
        if not self.bucket.take(now):
            self.rate_limited += 1
            try:
                q = dns.parse_query(data)
            except dns.DnsParseError:
                return None, None
            return dns.build_response(q, dns.REFUSED), None  # not audited one by one: counted
        try:
            q = dns.parse_query(data)
        except dns.DnsParseError as exc:
            if exc.qid is None:
                return None, DnsEvent("", "", "error", "malformed", str(exc), -1, code="protocol")
            return dns.build_error(exc.qid, exc.flags, exc.rcode), \
                DnsEvent("", "", "error", "malformed", str(exc), exc.rcode, code="protocol")
        if q.qclass != dns.CLASS_IN:
            return dns.build_response(q, dns.REFUSED), DnsEvent(q.name[:255], q.type_name, "refused", "dns",
                                                                "only class IN", dns.REFUSED, code="protocol")
        name = normalize_host(q.name)
        if name is None or parse_ip(name) is not None:
            return dns.build_response(q, dns.NXDOMAIN), DnsEvent(
                q.name[:255], q.type_name, "deny", "invalid-host", "not a valid host name", dns.NXDOMAIN, code="invalid-host")
        decision = self.policy.observed(self.policy.decide_connect(name))  # observe mode: would-deny passes
        if not decision.passes:
            return dns.build_response(q, dns.NXDOMAIN), DnsEvent(
                name, q.type_name, "deny", decision.rule, decision.reason, dns.NXDOMAIN, code=decision.code)
        if q.qtype in (dns.TYPE_A, dns.TYPE_ANY):
            ip = self.pool.address_for(name)
            return dns.build_response(q, dns.NOERROR, [ip], self.ttl), DnsEvent(
                name, q.type_name, decision.action, decision.rule, decision.reason, dns.NOERROR, ip,
                code=decision.code)
        # AAAA (no IPv6 in the guest), CNAME, HTTPS/SVCB, TXT, ...: the name exists, nothing else
        return dns.build_response(q, dns.NOERROR), DnsEvent(
            name, q.type_name, decision.action, decision.rule, "no records of this type are served", dns.NOERROR,
            code=decision.code)

    def take_rate_limited(self) -> int:
        n, self.rate_limited = self.rate_limited, 0
        return n
