"""Minimal SOCKS5 client (RFC 1928 CONNECT + RFC 1929 username/password) for the bridge -> proxy
hop. Only what we need, strict about every reply byte."""

from __future__ import annotations

import asyncio
import ipaddress
import struct

REPLIES = {1: "general failure", 2: "not allowed", 3: "network unreachable", 4: "host unreachable",
           5: "connection refused", 6: "TTL expired", 7: "command not supported", 8: "address type not supported"}


class Socks5Error(ConnectionError):
    pass


def connect_request(host: str, port: int) -> bytes:
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raw = host.encode("ascii")
        if not 0 < len(raw) < 256:
            raise Socks5Error("host name too long for SOCKS5") from None
        addr = b"\x03" + bytes([len(raw)]) + raw
    else:
        addr = (b"\x01" if ip.version == 4 else b"\x04") + ip.packed
    return b"\x05\x01\x00" + addr + struct.pack(">H", port)


async def handshake(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                    host: str, port: int, username: str, password: str) -> None:
    """Authenticate and CONNECT. Raises Socks5Error; on return the stream is the tunnel."""
    user, pw = username.encode(), password.encode()
    if not (0 < len(user) < 256 and 0 < len(pw) < 256):
        raise Socks5Error("SOCKS5 credentials must be 1..255 bytes")
    # pipelined: greeting, auth and request in one write saves two round trips
    writer.write(b"\x05\x01\x02" + b"\x01" + bytes([len(user)]) + user + bytes([len(pw)]) + pw
                 + connect_request(host, port))
    await writer.drain()
    try:
        greet = await reader.readexactly(2)
        if greet != b"\x05\x02":
            raise Socks5Error(f"proxy refused user/password authentication ({greet.hex()})")
        auth = await reader.readexactly(2)
        if auth != b"\x01\x00":
            raise Socks5Error("proxy rejected the credentials")
        head = await reader.readexactly(4)
        if head[0] != 5 or head[1] != 0:
            raise Socks5Error(f"proxy could not connect: {REPLIES.get(head[1], head[1])}")
        atyp = head[3]
        if atyp == 1:
            await reader.readexactly(4 + 2)
        elif atyp == 4:
            await reader.readexactly(16 + 2)
        elif atyp == 3:
            n = (await reader.readexactly(1))[0]
            await reader.readexactly(n + 2)
        else:
            raise Socks5Error("malformed SOCKS5 reply")
    except asyncio.IncompleteReadError:
        raise Socks5Error("proxy closed the connection during the SOCKS5 handshake") from None
