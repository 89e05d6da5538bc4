"""Pure matching helpers: host names, host patterns, paths. No I/O.

Why a module of its own: these few functions are the whole attack surface of "does this rule
apply", so they are small, total (never raise on hostile input) and property-tested.
"""

from __future__ import annotations

import fnmatch
import ipaddress
import re

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

_LABEL = re.compile(r"^[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?$")
MAX_NAME = 253


def _maybe_ip(text: str) -> bool:
    """Cheap pre-check: names with a letter other than a-f cannot be IP literals."""
    return not any(c not in "0123456789abcdefABCDEF.:[]" for c in text)


def parse_ip(text: str) -> IPAddress | None:
    """The IP address `text` spells, or None. Accepts '[v6]' brackets; IPv4-mapped v6 -> v4."""
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    if not _maybe_ip(text):
        return None
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped  # why: ::ffff:127.0.0.1 is loopback too
    return ip


def normalize_host(host: str) -> str | None:
    """Canonical form of a host the guest named: lowercase name without trailing dot, or the
    compressed IP literal. None if it is neither a valid DNS name nor an IP literal."""
    if not isinstance(host, str) or not host or len(host) > MAX_NAME + 3:
        return None
    ip = parse_ip(host)
    if ip is not None:
        return str(ip)
    name = host.lower()
    if name.endswith("."):
        name = name[:-1]
    if not name.isascii():
        try:
            name = name.encode("idna").decode("ascii")
        except (UnicodeError, ValueError):
            return None
    if not name or len(name) > MAX_NAME:
        return None
    labels = name.split(".")
    if not all(_LABEL.match(label) for label in labels):
        return None
    # why: a dotted all-numeric name ("1.2.3") is parsed as an address by some resolvers
    if all(label.isdigit() for label in labels):
        return None
    return name


class HostPattern:
    """`*` (any host), `*.suffix` (strict subdomains of suffix), an exact name, an IP, or a CIDR."""

    __slots__ = ("text", "kind", "value")

    def __init__(self, text: str):
        self.text = text
        if text == "*":
            self.kind, self.value = "any", None
            return
        if text.startswith("*."):
            suffix = normalize_host(text[2:])
            if suffix is None or parse_ip(suffix) is not None:
                raise ValueError(f"invalid wildcard host pattern {text!r}")
            self.kind, self.value = "suffix", suffix
            return
        if "/" in text:
            try:
                net = ipaddress.ip_network(text, strict=False)
            except ValueError:
                raise ValueError(f"invalid network {text!r}") from None
            self.kind, self.value = "net", net
            return
        ip = parse_ip(text)
        if ip is not None:
            self.kind, self.value = "net", ipaddress.ip_network(ip)
            return
        name = normalize_host(text)
        if name is None or "*" in text:
            raise ValueError(f"invalid host pattern {text!r} (use a name, '*.suffix', '*', an IP or a CIDR)")
        self.kind, self.value = "exact", name

    def matches(self, host: str, ip: "IPAddress | None | bool" = False) -> bool:
        """`host` must already be normalized (see normalize_host). `ip` is parse_ip(host) if the
        caller has it (decisions check many patterns against one host)."""
        if self.kind == "any":
            return True
        if ip is False:
            ip = parse_ip(host) if _maybe_ip(host) else None
        if self.kind == "net":
            return ip is not None and ip.version == self.value.version and ip in self.value
        if ip is not None:
            return False  # names never match IP literals
        if self.kind == "exact":
            return host == self.value
        return host.endswith("." + self.value)

    def names_address(self, ip: IPAddress) -> bool:
        """True if this pattern explicitly names `ip` (an IP or CIDR pattern containing it)."""
        return self.kind == "net" and ip.version == self.value.version and ip in self.value

    def __repr__(self) -> str:
        return f"HostPattern({self.text!r})"


_AMBIGUOUS = re.compile(r"(^|/)\.\.?(/|$)|%2e|%2f|%5c|\\", re.IGNORECASE)


def path_is_ambiguous(path: str) -> bool:
    """Paths a server might resolve differently from a glob (dot segments, encoded slashes or dots,
    backslashes). Allow rules with `paths` never match them; deny rules with `paths` always do."""
    return bool(_AMBIGUOUS.search(path)) or "\x00" in path


def path_matches(globs: tuple[str, ...], path: str) -> bool:
    """fnmatch-style, case-sensitive; `*` also matches '/'. The query string is not part of `path`."""
    return any(fnmatch.fnmatchcase(path, g) for g in globs)


def is_special_address(ip: IPAddress) -> bool:
    """Addresses the guest must not reach unless a rule names them: loopback, link-local
    (169.254.169.254 metadata), private, CGNAT, multicast, reserved, unspecified, ..."""
    return not ip.is_global or ip.is_multicast
