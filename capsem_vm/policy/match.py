"""Pure matching helpers: host names, host patterns, paths. No I/O.

Why a module of its own: these few functions are the whole attack surface of "does this rule
apply", so they are small, total (never raise on hostile input) and property-tested.
"""

from __future__ import annotations

import ipaddress
import re

from .addresses import protected_class

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

_LABEL = re.compile(r"^[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?$")
_NUMERIC_LABEL = re.compile(r"^(0x[0-9a-f]*|[0-9]+)$")
MAX_NAME = 253
_MAX_V4 = (0xFFFFFFFF, 0xFFFFFF, 0xFFFF, 0xFF)
_DIGITS = {8: "01234567", 10: "0123456789", 16: "0123456789abcdefABCDEF"}


def _maybe_ip(text: str) -> bool:
    """Cheap pre-check: names with a letter other than a-f or x cannot be IP literals."""
    return not any(c not in "0123456789abcdefABCDEFxX.:[]" for c in text)


def inet_aton(text: str) -> ipaddress.IPv4Address | None:
    """The IPv4 address glibc's inet_aton() reads in `text` (exactly, no trailing characters):
    1 to 4 dot-separated numbers, each decimal, octal (leading 0) or hex (0x), the last filling
    the remaining bytes ("127.1", "0x7f.1", "0177.0.0.1", "2130706433", "0x7f000001"). Why: the
    host's resolver (getaddrinfo) connects to that address, so the policy must judge it as one."""
    parts = text.split(".")
    if not 1 <= len(parts) <= 4:
        return None
    values = []
    for part in parts:
        if not part or not part.isascii() or not part[0].isdigit():
            return None
        if part[:2] in ("0x", "0X"):
            digits, base = part[2:], 16
        elif part[0] == "0":
            digits, base = part, 8
        else:
            digits, base = part, 10
        if not digits or any(c not in _DIGITS[base] for c in digits):
            return None
        value = int(digits, base)
        if value > 0xFFFFFFFF:
            return None
        values.append(value)
    *head, last = values
    if any(v > 0xFF for v in head) or last > _MAX_V4[len(head)]:
        return None
    number = last
    for i, v in enumerate(head):
        number |= v << (24 - 8 * i)
    return ipaddress.IPv4Address(number)


def v4_if_mapped(net):
    """An IPv4-mapped IPv6 network (::ffff:a.b.c.d/N, N >= 96) as the IPv4 network it is."""
    if net.version == 6 and net.prefixlen >= 96 and net.network_address.ipv4_mapped is not None:
        return ipaddress.IPv4Network((int(net.network_address) & 0xFFFFFFFF, net.prefixlen - 96))
    return net


def parse_ip(text: str) -> IPAddress | None:
    """The IP address `text` spells, or None. Accepts '[v6]' brackets; IPv4-mapped v6 -> v4;
    IPv4 in every spelling inet_aton accepts (see inet_aton)."""
    if not isinstance(text, str):
        return None
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    if not text or not _maybe_ip(text):
        return None
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        return inet_aton(text) if ":" not in text else None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped  # why: ::ffff:127.0.0.1 is loopback too
    return ip


def normalize_host(host: str) -> str | None:
    """Canonical form of a host the guest named: lowercase name without trailing dot, or the
    compressed IP literal (IPv4 in dotted decimal, whatever the spelling). None if it is neither a
    valid DNS name nor an IP literal."""
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
    # why: a dotted all-numeric name ("1.2.3.4.5", "0x7f.1.") is parsed as an address by some
    # resolvers and is no one's host name
    if all(_NUMERIC_LABEL.match(label) for label in labels):
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
                net = v4_if_mapped(ipaddress.ip_network(text, strict=False))
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


def is_special_address(ip: IPAddress) -> bool:
    """Addresses the guest must not reach unless a rule names them: loopback, link-local
    (169.254.169.254 metadata), private, CGNAT, multicast, reserved, unspecified, NAT64, 6to4,
    Teredo, IPv4-mapped/-compatible/SIIT, site-local, ... (addresses.protected_class; this host's
    own addresses are checked by Decision.address_allowed)."""
    return protected_class(ip) is not None
