"""Do the names a request carries agree with the destination that was judged? Pure, no I/O.

A request names its host in several places: the CONNECT / egress-stream target (what the policy
judged), the TLS SNI, the Host header(s), the authority of an absolute-form request line
(`GET https://other/x`), HTTP/2's :authority. Servers, CDNs and proxies pick different ones to
route by, so a request is only forwarded when every one of them names the judged host AND port
(a missing port meaning the connection scheme's default). Names compare after normalize_host
(case, trailing dot, IDNA to punycode, IP literal forms).

Strict by design (the guest chooses these bytes): userinfo (`u:p@host`), an empty port or one
with leading zeros, an unbracketed IPv6 address, anything normalize_host refuses, never agree. Total: no input raises.
"""

from __future__ import annotations

from .match import normalize_host

MAX_AUTHORITY = 300  # bytes; a 253-byte name, brackets, colon and port fit


def split_authority(text: str | bytes) -> tuple[str, int | None] | None:
    """(normalized host, port or None) of `host[:port]` / `[v6][:port]`, or None if it is not
    one (userinfo, junk, an empty or out-of-range port)."""
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError:
            return None
    if not isinstance(text, str) or not text or len(text) > MAX_AUTHORITY or "@" in text:
        return None
    port_text = None
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            return None
        host, rest = text[1:end], text[end + 1:]
        if rest:
            if not rest.startswith(":"):
                return None
            port_text = rest[1:]
        if ":" not in host:
            return None  # brackets are for IPv6 literals only
    else:
        if text.count(":") > 1:
            return None  # an unbracketed IPv6 literal: host and port cannot be told apart
        host, sep, port_text = text.partition(":")
        if not sep:
            port_text = None
    port = None
    if port_text is not None:
        if not (port_text.isascii() and port_text.isdigit() and len(port_text) <= 5) or port_text[0] == "0":
            return None  # one spelling per port: no leading zeros (nor port 0)
        port = int(port_text)
        if not 0 < port < 65536:
            return None
    name = normalize_host(host)
    if name is None:
        return None
    return name, port


def agrees(text: str | bytes, host: str, port: int, default_port: int) -> bool:
    """Does the authority `text` name exactly `host` (normalized) and `port`?"""
    parsed = split_authority(text)
    if parsed is None:
        return False
    name, p = parsed
    return name == host and (default_port if p is None else p) == port


def disagreement(names: list[tuple[str, str | bytes]], host: str, port: int, default_port: int) -> str | None:
    """None if every (where, authority) in `names` agrees with host:port; otherwise a one-line
    explanation naming the first that does not (guest text cut and made printable)."""
    for where, text in names:
        if not agrees(text, host, port, default_port):
            shown = text.decode("utf-8", "replace") if isinstance(text, bytes) else str(text)
            shown = "".join(c if c.isprintable() else "?" for c in shown[:100])
            return f"{where} {shown!r} does not name the destination {authority(host, port, default_port)!r}"
    return None


def authority(host: str, port: int, default_port: int) -> str:
    """The canonical authority of a judged destination: what goes upstream as Host/:authority."""
    literal = f"[{host}]" if ":" in host else host
    return literal if port == default_port else f"{literal}:{port}"
