"""Address classes the guest may not reach unless a rule names the address (anti-SSRF).

- protected_class(ip, own): the class `ip` is in ("loopback", "nat64", "6to4", "own", ...), or
  None for an ordinary global unicast address. Pure.
- embedded_ipv4(ip): the IPv4 addresses an IPv6 address carries (mapped, compatible, SIIT, NAT64,
  6to4, Teredo), so deny rules naming an IPv4 network also cover its IPv6 spellings. Pure.
- own_addresses(): every address of this host's own interfaces (the kernel's LOCAL routes in
  /proc/net/fib_trie, and /proc/net/if_inet6), plus 0.0.0.0 and :: (a connection to them reaches
  this host). Re-read at most every REFRESH seconds. Why: a host with a public address would
  otherwise serve its own services (Jupyter itself) to a guest whose policy allows "*".

Why classes beyond what `ipaddress.is_global` says: NAT64 (64:ff9b::/96, 64:ff9b:1::/48), SIIT
(::ffff:0:0:0/96), IPv4-compatible (::/96), 6to4 (2002::/16) and Teredo (2001::/32) addresses
carry an IPv4 address that a gateway may turn back into IPv4 (a private or loopback one), and
Python 3.11 calls most of them global; site-local fec0::/10 is routed inside a site.
"""

from __future__ import annotations

import ipaddress
import time

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

REFRESH = 5.0  # seconds an own_addresses() reading is reused

_V4 = [(ipaddress.IPv4Network(n), c) for n, c in (
    ("0.0.0.0/8", "unspecified"), ("127.0.0.0/8", "loopback"), ("10.0.0.0/8", "private"),
    ("172.16.0.0/12", "private"), ("192.168.0.0/16", "private"), ("100.64.0.0/10", "cgnat"),
    ("169.254.0.0/16", "link-local"), ("192.0.0.0/24", "ietf-protocol"), ("192.0.2.0/24", "documentation"),
    ("198.51.100.0/24", "documentation"), ("203.0.113.0/24", "documentation"),
    ("192.88.99.0/24", "6to4-relay"), ("198.18.0.0/15", "benchmarking"), ("224.0.0.0/4", "multicast"),
    ("240.0.0.0/4", "reserved"),
)]
_V6 = [(ipaddress.IPv6Network(n), c) for n, c in (
    ("::/128", "unspecified"), ("::1/128", "loopback"), ("::ffff:0:0/96", "ipv4-mapped"),
    ("::ffff:0:0:0/96", "siit"), ("::/96", "ipv4-compatible"),
    ("64:ff9b::/96", "nat64"), ("64:ff9b:1::/48", "nat64-local"), ("::/8", "reserved"), ("100::/64", "discard"),
    ("2001::/32", "teredo"), ("2001:db8::/32", "documentation"), ("2002::/16", "6to4"),
    ("3fff::/20", "documentation"), ("fc00::/7", "unique-local"), ("fec0::/10", "site-local"),
    ("fe80::/10", "link-local"), ("ff00::/8", "multicast"),
)]
NAT64_LOCAL = ipaddress.IPv6Network("64:ff9b:1::/48")
_ALWAYS_OWN = (ipaddress.IPv4Network("0.0.0.0/32"), ipaddress.IPv6Network("::/128"))


def _in(ip: IPAddress, net: IPNetwork) -> bool:
    return ip.version == net.version and ip in net


def protected_class(ip: IPAddress, own: tuple[IPNetwork, ...] = ()) -> str | None:
    """The protected class of `ip` ("own" for this host's addresses), None if it is an ordinary
    global unicast address."""
    if any(_in(ip, n) for n in own):
        return "own"
    for net, name in (_V4 if ip.version == 4 else _V6):
        if ip in net:
            return name
    if ip.is_multicast:
        return "multicast"
    if not ip.is_global:
        return "non-global"  # whatever else this Python's ipaddress knows to be special
    return None


def embedded_ipv4(ip: IPAddress) -> list[ipaddress.IPv4Address]:
    """IPv4 addresses carried by an IPv6 address of a translation or tunnel class."""
    if ip.version != 6 or int(ip) <= 1:  # ::, ::1 carry nothing
        return []
    out = []
    low32 = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    for net, name in _V6:
        if ip in net and name in ("ipv4-mapped", "siit", "ipv4-compatible", "nat64"):
            out.append(low32)
            break
    if ip in NAT64_LOCAL:  # RFC 6052 layout for a /48 prefix: bits 48-63 and 72-87
        v = int(ip)
        out.append(ipaddress.IPv4Address((((v >> 64) & 0xFFFF) << 16) | ((v >> 40) & 0xFFFF)))
    if ip.sixtofour is not None:
        out.append(ip.sixtofour)
    if ip.teredo is not None:
        out.extend(ip.teredo)  # (server, client)
    return out


# --- this host's own addresses -----------------------------------------------------------------------

# cache, owner: this process (own_addresses() alone reads and replaces it); the host's addresses
# are the same for every VM and policy of the process
_cache: tuple[float, tuple[IPNetwork, ...]] = (-1e18, ())


def _read_fib_trie(text: str) -> list[IPNetwork]:
    """LOCAL routes of /proc/net/fib_trie: a `|-- a.b.c.d` line, then `/N host LOCAL` lines."""
    out, last = [], None
    for line in text.splitlines():
        line = line.strip()
        if line.startswith(("|--", "+--")):
            word = line[3:].split()
            last = word[0] if word else None
        elif line.endswith("host LOCAL") and line.startswith("/") and last:
            try:
                out.append(ipaddress.IPv4Network(f"{last}/{line[1:].split()[0]}", strict=False))
            except ValueError:
                pass
    return out


def _read_if_inet6(text: str) -> list[IPNetwork]:
    out = []
    for line in text.splitlines():
        word = line.split()[:1]
        if word and len(word[0]) == 32:
            try:
                out.append(ipaddress.IPv6Network(int(word[0], 16)))
            except ValueError:
                pass
    return out


def read_own_addresses(fib_trie: str = "/proc/net/fib_trie", if_inet6: str = "/proc/net/if_inet6") -> tuple[IPNetwork, ...]:
    """This host's own addresses, read now (unreadable files give nothing: the fixed classes
    still refuse loopback and private addresses)."""
    nets: list[IPNetwork] = list(_ALWAYS_OWN)
    for path, parse in ((fib_trie, _read_fib_trie), (if_inet6, _read_if_inet6)):
        try:
            with open(path) as f:
                nets += parse(f.read(1 << 22))
        except OSError:
            pass
    return tuple(dict.fromkeys(nets))


def own_addresses(now: float | None = None) -> tuple[IPNetwork, ...]:
    """read_own_addresses(), cached for REFRESH seconds (decisions run per connection)."""
    global _cache
    now = time.monotonic() if now is None else now
    stamp, nets = _cache
    if not stamp <= now < stamp + REFRESH:
        nets = read_own_addresses()
        _cache = (now, nets)
    return nets
