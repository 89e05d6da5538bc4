"""The policy data model and its decisions. Pure: no I/O except Credential.read()/value().

Semantics (documented for users in `capsem policy --help` and docs):
- Rules are checked in order; the first rule that matches decides. No match: deny ("default").
- A rule without `scheme` matches http/https/ws/wss for `allow` and every scheme (tcp too) for
  `deny`. A rule without `port` allows only the scheme's default ports (80/443) but denies on
  every port: missing fields never widen what an allow rule lets out.
- `scheme = "tcp"` rules (port required) allow raw, non-HTTP TCP to host:port.
- `paths` are fnmatch globs on the URL path (no query). Ambiguous paths (dot segments, %2e, %2f,
  backslash) never match allow rules with `paths` and always match deny rules with `paths`.
- The destination address is checked after the host resolves: loopback, private, link-local,
  multicast etc. are refused unless the deciding rule names that address (its `host` is that
  IP/CIDR, or its `addresses` list contains it).
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from . import codes
from .match import (HostPattern, IPAddress, IPNetwork, is_special_address, normalize_host, parse_ip,
                    path_is_ambiguous, path_matches)

SCHEMES = ("http", "https", "ws", "wss", "tcp")
WEB_SCHEMES = frozenset({"http", "https", "ws", "wss"})
DEFAULT_PORT = {"http": 80, "ws": 80, "https": 443, "wss": 443}
ALLOW, DENY = "allow", "deny"
HOST_CACHE_MAX = 4096


@dataclass(frozen=True)
class Rule:
    name: str
    action: str
    host: HostPattern
    schemes: frozenset[str] | None = None
    ports: frozenset[int] | None = None
    methods: frozenset[str] | None = None
    paths: tuple[str, ...] | None = None
    reason: str = ""
    addresses: tuple[IPNetwork, ...] = ()
    origin: str = ""  # "policy.toml:12" or "preset pypi": where to look when it surprises you

    def _schemes(self) -> frozenset[str]:
        if self.schemes is not None:
            return self.schemes
        return WEB_SCHEMES if self.action == ALLOW else frozenset(SCHEMES)

    def port_ok(self, port: int, scheme: str | None = None) -> bool:
        if self.ports is not None:
            return port in self.ports
        if self.action == DENY:
            return True
        schemes = [scheme] if scheme else self._schemes()
        return any(DEFAULT_PORT.get(s) == port for s in schemes)

    @property
    def conditional(self) -> bool:
        """True if the rule looks inside requests (scheme, method or path): a connection or DNS
        lookup cannot be decided by it alone."""
        return bool(self.methods or self.paths or self.schemes is not None)

    def matches(self, method: str, scheme: str, host: str, port: int, path: str | None, ip=False) -> bool:
        if scheme not in self._schemes() or not self.host.matches(host, ip) or not self.port_ok(port, scheme):
            return False
        if scheme == "tcp":
            # raw TCP has no method or path: only rules that do not ask about them apply
            return not self.methods and not self.paths
        if self.methods and method not in self.methods and "*" not in self.methods:
            return False
        if self.paths:
            if path is None:
                return False
            if path_is_ambiguous(path):
                return self.action == DENY
            return path_matches(self.paths, path)
        return True

    def names_address(self, ip: IPAddress) -> bool:
        return self.host.names_address(ip) or any(ip.version == n.version and ip in n for n in self.addresses)


@dataclass(frozen=True)
class Decision:
    action: str
    rule: str
    reason: str
    origin: str = ""
    _rule: Rule | None = field(default=None, repr=False, compare=False)
    code: str = ""  # stable reason code (codes.CODES); derived when not given

    def __post_init__(self):
        if not self.code:
            # built-in decisions are named by their code; a rule's by whether it allows or denies
            code = self.rule if self._rule is None else f"rule-{self.action}"
            object.__setattr__(self, "code", code if codes.known(code) else f"rule-{self.action}")

    @property
    def allowed(self) -> bool:
        return self.action == ALLOW

    def address_allowed(self, ip: IPAddress | str) -> bool:
        """May the proxy connect to `ip`, a resolved address of the decided host?"""
        if isinstance(ip, str):
            parsed = parse_ip(ip)
            if parsed is None:
                return False
            ip = parsed
        if not self.allowed:
            return False
        if not is_special_address(ip):
            return True
        return self._rule is not None and self._rule.names_address(ip)

    def header(self) -> str:
        """Value of the X-Capsem-Policy response header."""
        text = f'{self.action}; rule="{self.rule}"; reason="{self.reason}"'
        return text.replace("\r", " ").replace("\n", " ")


def _decision(rule: Rule) -> Decision:
    code = "doh" if rule.origin == DOH_ORIGIN else ""
    return Decision(rule.action, rule.name, rule.reason, rule.origin, rule, code=code)


DEFAULT_DENY = Decision(DENY, "default", "no rule allows this (default deny)", "", code="default-deny")
DOH_ORIGIN = "built-in DoH deny list"


@dataclass(frozen=True)
class Credential:
    """A host secret the proxy injects; the guest only ever sees `placeholder`.

    The secret goes only where the credential says (capsem_vm/proxy/placement.py): `header` is
    set to `format` with the value on every matching request, and/or the value of query parameter
    `query` replaces the placeholder when the guest sent exactly the placeholder there. A
    placeholder anywhere else goes out as is."""

    name: str
    hosts: tuple[HostPattern, ...]
    placeholder: str
    env: str | None = None
    file: str | None = None
    header: str | None = None   # if set: this header is always set to `format` on matching requests
    format: str = "{value}"
    guest_env: str | None = None  # env var the guest gets, holding the placeholder
    origin: str = ""
    query: str | None = None    # if set: this query parameter gets the value in place of the placeholder

    def applies_to(self, host: str) -> bool:
        return any(p.matches(host) for p in self.hosts)

    def read(self) -> tuple[str | None, str]:
        """(the secret, "") read now from the host env or file, or (None, why not). Never log it."""
        if self.env:
            v = os.environ.get(self.env)
            return (v, "") if v else (None, f"host environment variable {self.env} is not set")
        if self.file:
            from .secret_file import SecretFileError, read_secret
            try:
                return read_secret(self.file), ""
            except SecretFileError as exc:
                return None, f"file {self.file} {exc}"
        return None, "no env or file"

    def value(self) -> str | None:
        """The secret, or None if unavailable (see read() for why)."""
        return self.read()[0]


@dataclass(frozen=True)
class Policy:
    rules: tuple[Rule, ...]
    credentials: tuple[Credential, ...] = ()
    source: str = "<default>"
    text: str = ""  # the TOML it came from (sent to the proxy service verbatim)
    # host -> the rules whose host pattern matches it, in order (decide() runs per request)
    _by_host: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def _rules_for(self, host: str, ip) -> tuple[Rule, ...]:
        rules = self._by_host.get(host)
        if rules is None:
            if len(self._by_host) >= HOST_CACHE_MAX:
                self._by_host.clear()
            rules = self._by_host[host] = tuple(r for r in self.rules if r.host.matches(host, ip))
        return rules

    # --- decisions ------------------------------------------------------------------------------

    def decide(self, method: str, url: str) -> Decision:
        """Decide one request. `url` is absolute: http(s)://, ws(s):// or tcp://host:port."""
        try:
            parts = urlsplit(url)
            scheme = parts.scheme.lower()
            raw_host = parts.hostname or ""
            port = parts.port
        except ValueError:
            return Decision(DENY, "invalid-url", "the URL cannot be parsed")
        if scheme not in SCHEMES:
            return Decision(DENY, "invalid-url", f"unsupported scheme {scheme!r}")
        host = normalize_host(raw_host)
        if host is None:
            return Decision(DENY, "invalid-host", f"{raw_host[:100]!r} is not a valid host name or address")
        if port is None:
            if scheme == "tcp":
                return Decision(DENY, "invalid-url", "tcp:// URLs need a port")
            port = DEFAULT_PORT[scheme]
        if not 0 < port < 65536:
            return Decision(DENY, "invalid-url", "port out of range")
        path = None if scheme == "tcp" else (parts.path or "/")
        method = (method or "").upper()
        ip = parse_ip(host)
        for rule in self._rules_for(host, ip):
            if rule.matches(method, scheme, host, port, path, ip):
                if rule.paths and path is not None and path_is_ambiguous(path):
                    return Decision(DENY, "ambiguous-path", "path has dot segments or encoded '/', '.', '\\': "
                                    f"treated as matching deny rule {rule.name!r}", rule.origin, rule,
                                    code="ambiguous-path")
                return _decision(rule)
        return DEFAULT_DENY

    def decide_connect(self, host: str, port: int | None = None) -> Decision:
        """Decide a connection before any byte of it is seen (port None: a DNS lookup).

        Allow means "some request on it may be allowed": each request is decided again."""
        name = normalize_host(host)
        if name is None:
            return Decision(DENY, "invalid-host", f"{str(host)[:100]!r} is not a valid host name or address")
        ip = parse_ip(name)
        for rule in self.rules:
            if not rule.host.matches(name, ip):
                continue
            if port is not None and not rule.port_ok(port):
                continue
            if rule.action == ALLOW:
                return _decision(rule)
            # a deny that looks inside requests, or (for DNS) covers only some ports, denies only
            # part of what could follow: keep looking
            if not (rule.conditional or (port is None and rule.ports is not None)):
                return _decision(rule)
        return DEFAULT_DENY

    def credentials_for(self, host: str) -> list[Credential]:
        name = normalize_host(host)
        return [c for c in self.credentials if name and c.applies_to(name)]

    def guest_env(self) -> dict[str, str]:
        """Environment the guest gets for declared credentials: name -> placeholder."""
        return {c.guest_env: c.placeholder for c in self.credentials if c.guest_env}


def ip_network(text: str) -> IPNetwork:
    return ipaddress.ip_network(text, strict=False)
