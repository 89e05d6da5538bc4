"""Transparent capture: TCP connections the nftables redirect (netsetup.py) sends here.

Every TCP connection a guest program opens to a non-local address lands on 127.0.0.1:15001; the
address it wanted is in SO_ORIGINAL_DST. It goes to the host as an egress stream naming that
address (a synthetic 198.18/15 address from our DNS maps back to its name on the host), so
programs that ignore the proxy variables are judged by the same policy.

A refused connection is reset, except that a client that visibly speaks plain HTTP gets the
same 403 (with X-Capsem-Policy) the HTTP proxy would give it.
"""

from __future__ import annotations

import socket
import struct

from . import egress_stream, httpproxy

HOST, PORT = "127.0.0.1", 15001
SO_ORIGINAL_DST = 80  # linux/netfilter_ipv4.h
PEEK_TIMEOUT = 0.3    # how long a refused client may take to show it speaks HTTP


def original_dst(sock: socket.socket) -> tuple[str, int]:
    raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
    port = struct.unpack_from("!H", raw, 2)[0]
    return socket.inet_ntoa(raw[4:8]), port


def _speaks_http(sock: socket.socket) -> bool:
    sock.settimeout(PEEK_TIMEOUT)
    try:
        head = sock.recv(16, socket.MSG_PEEK)
    except OSError:
        return False
    word = head.split(b" ", 1)[0]
    return len(head) > len(word) and word in httpproxy.METHODS


def handle(client: socket.socket) -> None:
    try:
        ip, port = original_dst(client)
    except OSError:
        egress_stream.reset(client)  # not redirected: someone connected to us directly
        return
    if ip.startswith("127.") or (ip, port) == (HOST, PORT):
        egress_stream.reset(client)
        return
    try:
        upstream = egress_stream.open_stream(ip, port)
    except egress_stream.Refused as exc:
        if _speaks_http(client):
            try:
                client.sendall(httpproxy.refusal(f"{ip}:{port}", exc))
                client.shutdown(socket.SHUT_WR)
            except OSError:
                pass
            client.close()
        else:
            egress_stream.reset(client)
        return
    except OSError:
        egress_stream.reset(client)
        return
    try:
        egress_stream.splice(client, upstream)
    finally:
        upstream.close()


def start(host: str = HOST, port: int = PORT) -> egress_stream.Server:
    return egress_stream.Server(egress_stream.tcp_listener(host, port), handle, name="capture").start()
