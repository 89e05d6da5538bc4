"""Stable reason codes: one short identifier per kind of egress decision, for machines.

Every audit row and every refusal (403 body, X-Capsem-Policy, guest-side error) carries one of
these in its `code`. Rule names are the user's words and may change; codes do not: tools that read
the audit log (`capsem policy suggest`, the server extension, agents, Ray nodes) branch on them.
Adding a code is fine; renaming or reusing one is a breaking change (docs/AUDIT.md).
"""

from __future__ import annotations

CODES: dict[str, str] = {
    # decided by the user's policy
    "rule-allow": "an allow rule of the policy matched",
    "rule-deny": "a deny rule of the policy matched",
    "default-deny": "no rule of the policy allows this (default deny)",
    "doh": "a built-in DNS-over-HTTPS deny rule matched (settings.allow_doh = false)",
    # built-in protections (decided before or besides the rules)
    "invalid-host": "the host is not a valid DNS name or IP address",
    "invalid-url": "the request target cannot be parsed, or its scheme or port is not allowed",
    "ambiguous-path": "the path has a spelling servers may resolve differently (dot segments, encoded "
                      "separators, parameters); treated as matching a deny rule with paths",
    "host-mismatch": "the names a request carries (CONNECT target, SNI, Host, absolute-form authority, "
                     ":authority) do not agree with the judged destination",
    "sni-mismatch": "the TLS SNI does not match the destination",
    "upgrade-mismatch": "a protocol switch (101 response, HTTP/2 extended CONNECT) for a request that "
                        "was not judged as a WebSocket: the connection is killed",
    "connect-method": "a CONNECT tunnel inside a judged connection needs a rule listing method CONNECT",
    "address": "the destination address is in a protected class (loopback, private, link-local, NAT64, "
               "6to4, the host's own addresses, ...) and no rule names it",
    "resolve": "the name does not resolve on the host",
    "header-timeout": "request headers were not complete in time (slow loris)",
    "header-size": "request headers were too large",
    "body-size": "a denied request had a large or unbounded body: connection reset instead of a 403",
    "protocol": "a malformed egress or DNS frame from the guest",
    "limit": "a per-VM limit (concurrent streams, DNS streams) was reached",
    "dns-rate": "DNS queries over the per-VM rate limit",
    "control-port": "a guest connection to a vsock port the host does not serve",
    "credential": "a credential could not be placed (missing on the host, or unsafe to send)",
    "audit-unavailable": "the audit log cannot be written: egress is refused rather than unaudited",
    "audit-overflow": "audit rows were dropped because the writer fell behind",
    "audit-rate": "refusals over the audit log's per-kernel row rate, counted in one row per window "
                  "instead of one row each (their own codes are listed in the reason)",
    "audit-rotated": "the audit database reached its size cap: the oldest rows were deleted",
    "proxy-unavailable": "the proxy service is not running for this kernel",
    "proxy-restarting": "a proxy service worker died and is being restarted: egress is refused until it is back",
    "policy-change": "a kernel's policy was changed and reloaded while it ran (kind = policy: who changed "
                     "what, in which file)",
    "error": "the request was allowed but failed (upstream error, reset, timeout)",
}


def known(code: str) -> bool:
    return code in CODES
