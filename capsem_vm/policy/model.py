"""The policy data model and its decisions. Pure: no I/O except Credential.read()/value().

Semantics (documented for users in `capsem policy --help` and docs):
- Rules are checked in order; the first rule that matches decides. No match: deny ("default").
- A rule without `scheme` matches http/https/ws/wss for `allow` and every scheme (tcp too) for
  `deny`. A rule without `port` allows only the scheme's default ports (80/443) but denies on
  every port: missing fields never widen what an allow rule lets out.
- `scheme = "tcp"` rules (port required) allow raw, non-HTTP TCP to host:port.
- `paths` are fnmatch globs on the URL path (no query), matched after canonicalization
  (paths.py): escapes of unreserved characters decoded, dot segments removed. Allow rules match
  the canonical path exactly (case-sensitive); deny rules also match its loose reading (every
  escape decoded, casefolded, `;params` cut, repeated slashes collapsed), so `/%61dmin`,
  `//ADMIN` and `/x/..;/admin` are all `/admin` to a deny rule. Paths servers may still read
  differently (encoded separators, `%25`, `;`, backslashes, control characters, malformed
  escapes) never match allow rules with `paths` and always match deny rules with `paths`. The
  proxy sends the canonical path upstream: the server receives the path that was judged.
- Hosts are judged in one spelling: IPv4 written as inet_aton reads it (`0x7f.1`, `0177.0.0.1`,
  `2130706433`) and IPv4-mapped IPv6 are the dotted IPv4 address.
- The destination address is checked after the host resolves: loopback, private, link-local,
  multicast, NAT64, 6to4, Teredo, IPv4-compatible/SIIT, site-local etc. (addresses.py) are
  refused unless the deciding rule names that address (its `host` is that IP/CIDR, or its
  `addresses` list contains it); this host's own non-loopback addresses only when named exactly
  (a single address, not a network that contains it).
- Deny rules whose host is an IP or CIDR also refuse names that resolve into it (and IPv6 forms
  that carry such an IPv4 address), checked by the proxy after resolution.
- Observe mode (`[settings] observe = true`, never a default): `Policy.observed(d)` turns the
  policy's own refusals (codes OBSERVABLE_CODES: default-deny, rule-deny) into WOULD_DENY
  decisions, which pass and are audited as such. Built-in refusals (DoH, ambiguous paths,
  invalid hosts, Host/SNI disagreement, ...) keep their code and stay refusals; a would-deny
  never reaches a protected address and never gets a credential (`allowed` is False for it:
  only `passes` is True).
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from fnmatch import fnmatchcase

from . import codes
from .addresses import embedded_ipv4, own_addresses, protected_class
from .match import HostPattern, IPAddress, IPNetwork, normalize_host, parse_ip, v4_if_mapped
from .paths import CanonicalPath, allow_glob, canonicalize, deny_glob

SCHEMES = ("http", "https", "ws", "wss", "tcp")
WEB_SCHEMES = frozenset({"http", "https", "ws", "wss"})
DEFAULT_PORT = {"http": 80, "ws": 80, "https": 443, "wss": 443}
ALLOW, DENY, WOULD_DENY = "allow", "deny", "would-deny"
# the refusals observe mode lets through: the user's policy saying no, never a built-in protection
OBSERVABLE_CODES = frozenset({"default-deny", "rule-deny"})
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

    # the `paths` globs as they are matched (see _match_path); derived, not compared
    _globs: tuple = field(default=(), init=False, repr=False, compare=False)

    def __post_init__(self):
        if self.paths:
            globs = tuple((allow_glob(g), deny_glob(g) if self.action == DENY else None) for g in self.paths)
            object.__setattr__(self, "_globs", globs)

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

    def _applies(self, method: str, scheme: str, port: int) -> bool:
        """Everything but the host and the path."""
        if scheme not in self._schemes() or not self.port_ok(port, scheme):
            return False
        if scheme == "tcp":
            # raw TCP has no method or path: only rules that do not ask about them apply
            return not self.methods and not self.paths
        return not (self.methods and method not in self.methods and "*" not in self.methods)

    def _match_path(self, path: CanonicalPath) -> str:
        """"" (no match), "match", or "ambiguous" (a deny rule taking an ambiguous path)."""
        if self.action == ALLOW:
            if path.ambiguous:
                return ""
            return "match" if any(fnmatchcase(path.path, g) for g, _ in self._globs) else ""
        if any(fnmatchcase(path.loose, loose) or fnmatchcase(path.path, g) for g, loose in self._globs):
            return "match"
        # why two_readings is exempt: both of its readings were just matched (paths.py)
        return "ambiguous" if path.ambiguous and not path.two_readings else ""

    def matches(self, method: str, scheme: str, host: str, port: int, path: "str | CanonicalPath | None",
                ip=False) -> bool:
        if not self.host.matches(host, ip) or not self._applies(method, scheme, port):
            return False
        if self.paths and scheme != "tcp":
            if path is None:
                return False
            return bool(self._match_path(path if isinstance(path, CanonicalPath) else canonicalize(path)))
        return True

    def covers_address(self, ip: IPAddress) -> bool:
        """This rule's host is an IP/CIDR that contains `ip` or an IPv4 address `ip` carries."""
        if self.host.kind != "net":
            return False
        net = self.host.value
        return any(a.version == net.version and a in net for a in [ip, *embedded_ipv4(ip)])

    def names_address(self, ip: IPAddress, exact: bool = False) -> bool:
        """The rule names `ip`: its host is that IP/CIDR or its `addresses` contain it. `exact`: only
        a single-address entry equal to `ip` counts (for this host's own addresses)."""
        nets = ([self.host.value] if self.host.kind == "net" else []) + list(self.addresses)
        if exact:
            return any(n.prefixlen == n.max_prefixlen and n.network_address == ip for n in nets)
        return any(ip.version == n.version and ip in n for n in nets)


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
        """The policy says yes (what credentials need). A would-deny is not allowed, it only passes."""
        return self.action == ALLOW

    @property
    def passes(self) -> bool:
        """The traffic may go on: allowed, or a policy refusal let through by observe mode."""
        return self.action in (ALLOW, WOULD_DENY)

    def address_allowed(self, ip: IPAddress | str, own: tuple[IPNetwork, ...] | None = None) -> bool:
        """May the proxy connect to `ip`, a resolved address of the decided host? A protected address
        (addresses.protected_class) only if the deciding rule allows and names it; this host's own
        addresses (`own`, default: read from /proc, cached) other than loopback only if named
        exactly. A would-deny (observe mode) reaches no protected address at all."""
        if isinstance(ip, str):
            parsed = parse_ip(ip)
            if parsed is None:
                return False
            ip = parsed
        if not self.passes:
            return False
        cls = protected_class(ip, own_addresses() if own is None else own)
        if cls is None:
            return True
        # why allowed, not passes: the rule deciding a would-deny may be a deny rule whose host is
        # the very network (10.0.0.0/8) it keeps the guest out of
        return (self.allowed and self._rule is not None
                and self._rule.names_address(ip, exact=cls == "own" and not ip.is_loopback))

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
    observe: bool = False  # [settings] observe: policy refusals pass as would-deny (see observed)
    # host -> the rules whose host pattern matches it, in order (decide() runs per request)
    _by_host: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def _rules_for(self, host: str, ip, address: IPAddress | None = None) -> tuple[Rule, ...]:
        """The rules whose host matches `host`, plus the deny rules whose IP/CIDR covers `address`
        (where `host` resolved to), in policy order."""
        key = (host, address)
        rules = self._by_host.get(key)
        if rules is None:
            if len(self._by_host) >= HOST_CACHE_MAX:
                self._by_host.clear()
            rules = self._by_host[key] = tuple(
                r for r in self.rules
                if r.host.matches(host, ip) or (address is not None and r.action == DENY and r.covers_address(address)))
        return rules

    # --- decisions ------------------------------------------------------------------------------

    def decide(self, method: str, url: str, address: IPAddress | str | None = None) -> Decision:
        """Decide one request. `url` is absolute: http(s)://, ws(s):// or tcp://host:port.
        `address`: where the host resolved to, if known (deny rules naming it then apply too)."""
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
        path = None if scheme == "tcp" else canonicalize(parts.path or "/")
        method = (method or "").upper()
        ip = parse_ip(host)
        if isinstance(address, str):
            address = parse_ip(address)
        for rule in self._rules_for(host, ip, address if address != ip else None):
            if not rule._applies(method, scheme, port):
                continue
            if rule.paths and path is not None:
                how = rule._match_path(path)
                if not how:
                    continue
                if how == "ambiguous":
                    return Decision(DENY, "ambiguous-path", f"the path has a spelling servers read differently "
                                    f"({path.ambiguous}): treated as matching deny rule {rule.name!r}",
                                    rule.origin, rule, code="ambiguous-path")
            elif rule.paths:
                continue
            return _decision(rule)
        return DEFAULT_DENY

    def address_denied(self, ip: IPAddress | str, port: int) -> Decision | None:
        """The decision of a deny rule whose IP/CIDR covers `ip` (a resolved or literal destination,
        or an IPv4 address it carries), if the first IP/CIDR rule covering it on `port` is such a
        deny. Deny rules that look inside requests are left to decide() with `address`."""
        if isinstance(ip, str):
            ip = parse_ip(ip)
            if ip is None:
                return None
        for rule in self.rules:
            if not rule.covers_address(ip) or not rule.port_ok(port):
                continue
            if rule.action == ALLOW:
                return None
            if not rule.conditional:
                return _decision(rule)
        return None

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

    def observed(self, d: Decision) -> Decision:
        """`d` as the proxy enforces it: in observe mode a refusal of the policy itself (code in
        OBSERVABLE_CODES) becomes WOULD_DENY, same rule, reason and code; anything else unchanged.
        decide()/decide_connect() stay the policy's own verdicts (suggest, `capsem policy test`)."""
        if self.observe and d.action == DENY and d.code in OBSERVABLE_CODES:
            return Decision(WOULD_DENY, d.rule, d.reason, d.origin, d._rule, code=d.code)
        return d

    def credentials_for(self, host: str) -> list[Credential]:
        name = normalize_host(host)
        return [c for c in self.credentials if name and c.applies_to(name)]

    def guest_env(self) -> dict[str, str]:
        """Environment the guest gets for declared credentials: name -> placeholder."""
        return {c.guest_env: c.placeholder for c in self.credentials if c.guest_env}


def ip_network(text: str) -> IPNetwork:
    return v4_if_mapped(ipaddress.ip_network(text, strict=False))
