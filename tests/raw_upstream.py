"""A real HTTP/1.1 server that records every request it receives, byte for byte (no tests here): the
oracle of the path-spelling and credential-placement tests is what a server really got.

    up = RawUpstream("127.0.0.1")                 # or ssl_ctx=... for HTTPS
    ... requests through the proxy ...
    up.targets                                    # [b"/admin", ...] in arrival order
    up.requests                                   # the whole requests: head, body, chunks, trailers
    up.close()

Each connection may carry several requests (keep-alive; Content-Length and chunked bodies are read
and recorded); every answer is 200 with a JSON body {"target": ...}, or with echo=True
{"raw": <the whole request>} and X-Echo-Auth: <its Authorization> (to check what the proxy lets
the guest see of it). Threads, so it serves whatever event loop the test runs."""

from __future__ import annotations

import json
import socket
import ssl
import subprocess
import threading

HEAD_MAX = 256 * 1024


class RawUpstream:
    def __init__(self, host: str = "127.0.0.1", port: int = 0, ssl_ctx: ssl.SSLContext | None = None,
                 echo: bool = False):
        self.sock = socket.create_server((host, port))
        self.host, self.port = host, self.sock.getsockname()[1]
        self.ssl_ctx, self.echo = ssl_ctx, echo
        self.targets: list[bytes] = []
        self.requests: list[bytes] = []
        self.lock = threading.Lock()
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def clear(self) -> None:
        with self.lock:
            self.targets.clear()
            self.requests.clear()

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
                close = chunked = False
                auth = None  # the first Authorization header's value
                for line in lines[1:]:
                    name, _, value = line.partition(b":")
                    name = name.strip().lower()
                    if name == b"content-length":
                        length = int(value.strip() or 0)
                    if name == b"connection" and b"close" in value.lower():
                        close = True
                    if name == b"transfer-encoding" and b"chunked" in value.lower():
                        chunked = True
                    if name == b"authorization" and auth is None:
                        auth = value.strip()
                if chunked:
                    body, buf = self._chunked(conn, buf)
                    if body is None:
                        return
                else:
                    while len(buf) < length:
                        chunk = conn.recv(65536)
                        if not chunk:
                            return
                        buf += chunk
                    body, buf = buf[:length], buf[length:]
                raw = head + b"\r\n\r\n" + body
                with self.lock:
                    self.requests.append(raw)
                if self.echo:
                    answer = json.dumps({"raw": raw.decode("latin-1")}).encode()
                    extra = b"\r\nX-Echo-Auth: " + (auth or b"")
                else:
                    answer, extra = json.dumps({"target": target.decode("latin-1")}).encode(), b""
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json" + extra + b"\r\nContent-Length: "
                             + str(len(answer)).encode() + (b"\r\nConnection: close" if close else b"")
                             + b"\r\n\r\n" + answer)
                if close:
                    return
        except (OSError, ValueError, ssl.SSLError):
            return
        finally:
            try:
                conn.close()
            except OSError:
                pass


    @staticmethod
    def _chunked(conn, buf: bytes) -> tuple[bytes | None, bytes]:
        """(the chunked body as received: sizes, data, trailers, final empty line; None if the
        connection ended first, rest of buf)."""
        def line() -> bytes | None:
            nonlocal buf
            while b"\r\n" not in buf:
                chunk = conn.recv(65536)
                if not chunk or len(buf) > HEAD_MAX:
                    return None
                buf += chunk
            out, buf = buf.split(b"\r\n", 1)
            return out + b"\r\n"
        body = b""
        while True:
            size_line = line()
            if size_line is None:
                return None, buf
            body += size_line
            size = int(size_line.split(b";")[0].strip(), 16)
            if size == 0:
                while True:  # trailers, then an empty line
                    t = line()
                    if t is None:
                        return None, buf
                    body += t
                    if t == b"\r\n":
                        return body, buf
            while len(buf) < size + 2:
                chunk = conn.recv(65536)
                if not chunk:
                    return None, buf
                buf += chunk
            body, buf = body + buf[:size + 2], buf[size + 2:]


def own_ipv4() -> str | None:
    """This machine's first non-loopback IPv4 address (`hostname -I`): where tests serve "the
    host's own services" (traffic never leaves the machine)."""
    for a in subprocess.run(["hostname", "-I"], capture_output=True, text=True).stdout.split():
        if ":" not in a and not a.startswith("127."):
            return a
    return None
