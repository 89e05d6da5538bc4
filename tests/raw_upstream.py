"""A real HTTP/1.1 server that records the raw request target of every request it receives (no
tests here): the oracle of the path-spelling tests is what a server really got, byte for byte.

    up = RawUpstream("127.0.0.1")                 # or ssl_ctx=... for HTTPS
    ... requests through the proxy ...
    up.targets                                    # [b"/admin", ...] in arrival order
    up.close()

Each connection may carry several requests (keep-alive; Content-Length bodies are read and
dropped); every answer is 200 with a JSON body {"target": ...}. Threads, so it serves whatever
event loop the test runs."""

from __future__ import annotations

import json
import socket
import ssl
import subprocess
import threading

HEAD_MAX = 256 * 1024


class RawUpstream:
    def __init__(self, host: str = "127.0.0.1", port: int = 0, ssl_ctx: ssl.SSLContext | None = None):
        self.sock = socket.create_server((host, port))
        self.host, self.port = host, self.sock.getsockname()[1]
        self.ssl_ctx = ssl_ctx
        self.targets: list[bytes] = []
        self.lock = threading.Lock()
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def clear(self) -> None:
        with self.lock:
            self.targets.clear()

    def seen(self) -> list[bytes]:
        with self.lock:
            return list(self.targets)

    def close(self) -> None:
        self._closed = True
        try:
            self.sock.close()
        except OSError:
            pass

    def _accept(self) -> None:
        while not self._closed:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        conn.settimeout(30)
        try:
            if self.ssl_ctx is not None:
                conn = self.ssl_ctx.wrap_socket(conn, server_side=True)
            buf = b""
            while True:
                while b"\r\n\r\n" not in buf:
                    chunk = conn.recv(65536)
                    if not chunk or len(buf) > HEAD_MAX:
                        return
                    buf += chunk
                head, buf = buf.split(b"\r\n\r\n", 1)
                lines = head.split(b"\r\n")
                parts = lines[0].split(b" ")
                target = parts[1] if len(parts) >= 3 else lines[0]
                with self.lock:
                    self.targets.append(target)
                length = 0
                close = False
                for line in lines[1:]:
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value.strip() or 0)
                    if name.strip().lower() == b"connection" and b"close" in value.lower():
                        close = True
                while len(buf) < length:
                    chunk = conn.recv(65536)
                    if not chunk:
                        return
                    buf += chunk
                buf = buf[length:]
                body = json.dumps({"target": target.decode("latin-1")}).encode()
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: "
                             + str(len(body)).encode() + (b"\r\nConnection: close" if close else b"") + b"\r\n\r\n" + body)
                if close:
                    return
        except (OSError, ValueError, ssl.SSLError):
            return
        finally:
            try:
                conn.close()
            except OSError:
                pass


def own_ipv4() -> str | None:
    """This machine's first non-loopback IPv4 address (`hostname -I`): where tests serve "the
    host's own services" (traffic never leaves the machine)."""
    for a in subprocess.run(["hostname", "-I"], capture_output=True, text=True).stdout.split():
        if ":" not in a and not a.startswith("127."):
            return a
    return None
