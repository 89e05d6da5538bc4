"""The guest's local HTTP proxy (127.0.0.1:3128), set in HTTP(S)_PROXY for every exec and kernel.

    CONNECT host:port              -> an egress stream to host:port (the name, not an address);
                                      "200 Connection established", then raw bytes (TLS inside)
    GET http://host[:port]/p ...   -> an egress stream to host:port (80 by default); each request
                                      is rewritten to origin-form ("GET /p"), Host set from the URL
    refused by the host            -> 403 with X-Capsem-Policy: deny; rule="..."; reason="..."

A client connection keeps one upstream stream while its requests name the same host:port; a
request for another one closes that stream and opens a new one (responses are not parsed: a
client pipelining requests to different hosts on one connection may lose responses).
Request bodies are delimited (Content-Length or chunked) so the next request head is found.
"""

from __future__ import annotations

import re
import socket
from urllib.parse import urlsplit

from . import egress_stream

HOST, PORT = "127.0.0.1", 3128
HEAD_MAX = 64 * 1024
LINE_MAX = 8192
FIRST_TIMEOUT = 30.0   # for the first request head
IDLE_TIMEOUT = 300.0   # between requests, and for any single read of a body
METHODS = frozenset(m.encode() for m in (
    "GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH", "TRACE", "CONNECT", "PROPFIND",
    "PROPPATCH", "MKCOL", "COPY", "MOVE", "LOCK", "UNLOCK", "REPORT", "SEARCH"))
HOP_BY_HOP = frozenset({"proxy-connection", "proxy-authorization", "proxy-authenticate", "keep-alive"})
_TOKEN = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")


class HttpError(Exception):
    def __init__(self, status: int, text: str):
        super().__init__(text)
        self.status = status
        self.text = text


_PHRASES = {400: "Bad Request", 403: "Forbidden", 405: "Method Not Allowed", 408: "Request Timeout",
            411: "Length Required", 431: "Request Header Fields Too Large", 501: "Not Implemented",
            502: "Bad Gateway", 504: "Gateway Timeout"}


def _header_safe(text: str, limit: int = 500) -> str:
    text = "".join(ch if 32 <= ord(ch) < 127 and ch != '"' else " " for ch in text)
    return text[:limit]


def response(status: int, text: str, extra: dict | None = None) -> bytes:
    body = text.encode("utf-8", "replace")
    lines = [f"HTTP/1.1 {status} {_PHRASES.get(status, 'Error')}",
             "Content-Type: text/plain; charset=utf-8", f"Content-Length: {len(body)}", "Connection: close"]
    lines += [f"{k}: {v}" for k, v in (extra or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1", "replace") + body


def refusal(target: str, exc: egress_stream.Refused) -> bytes:
    """The 403 for a connection the host refused (same shape as the host proxy's own 403s)."""
    rule, reason = _header_safe(exc.rule, 100), _header_safe(exc.reason)
    text = (f"capsem: connection to {target} blocked by egress policy\nrule: {exc.rule}\n"
            f"reason: {exc.reason}\n")
    return response(403, text, {"X-Capsem-Policy": f'deny; rule="{rule}"; reason="{reason}"'})


# --- reading the client ---------------------------------------------------------------------------

class ClientReader:
    """Buffered reads from the client, every read bounded in size and time."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.buf = bytearray()

    def _fill(self, timeout: float) -> bool:
        self.sock.settimeout(timeout)
        try:
            data = self.sock.recv(egress_stream.CHUNK)
        except socket.timeout:
            raise HttpError(408, "capsem proxy: timed out waiting for the client") from None
        if not data:
            return False
        self.buf += data
        return True

    def head(self, timeout: float) -> bytes | None:
        """The next request head (without the blank line), or None at a clean end of input."""
        while True:
            end = self.buf.find(b"\r\n\r\n")
            if end >= 0:
                head = bytes(self.buf[:end])
                del self.buf[:end + 4]
                return head
            if len(self.buf) > HEAD_MAX:
                raise HttpError(431, "capsem proxy: request head too large")
            if not self._fill(timeout):
                if self.buf.strip():
                    raise HttpError(400, "capsem proxy: incomplete request head")
                return None

    def line(self) -> bytes:
        while True:
            end = self.buf.find(b"\r\n")
            if end >= 0:
                line = bytes(self.buf[:end + 2])
                del self.buf[:end + 2]
                return line
            if len(self.buf) > LINE_MAX:
                raise HttpError(400, "capsem proxy: chunk line too long")
            if not self._fill(IDLE_TIMEOUT):
                raise ConnectionError("client went away in a body")

    def copy(self, n: int, dst: socket.socket) -> None:
        while n > 0:
            if not self.buf and not self._fill(IDLE_TIMEOUT):
                raise ConnectionError("client went away in a body")
            part = bytes(self.buf[:n])
            del self.buf[:len(part)]
            dst.sendall(part)
            n -= len(part)

    def take(self) -> bytes:
        data, self.buf = bytes(self.buf), bytearray()
        return data


# --- parsing --------------------------------------------------------------------------------------

class Request:
    def __init__(self, method: str, target: str, version: str, headers: list[tuple[str, str]]):
        self.method, self.target, self.version, self.headers = method, target, version, headers

    def values(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k.lower() == name]

    def tokens(self, name: str) -> set[str]:
        return {t.strip().lower() for v in self.values(name) for t in v.split(",") if t.strip()}


def parse_head(head: bytes) -> Request:
    try:
        text = head.decode("latin-1")
    except UnicodeDecodeError:  # pragma: no cover - latin-1 decodes everything
        raise HttpError(400, "capsem proxy: bad request head") from None
    lines = text.split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not _TOKEN.match(parts[0]) or not parts[2].startswith("HTTP/1."):
        raise HttpError(400, "capsem proxy: bad request line")
    headers = []
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if not sep or not _TOKEN.match(name):
            raise HttpError(400, "capsem proxy: bad header line")
        headers.append((name, value.strip()))
    return Request(parts[0].upper(), parts[1], parts[2], headers)


def parse_authority(authority: str, default_port: int | None) -> tuple[str, int]:
    """host[:port] or [v6]:port -> (host, port); the host as written (the host side judges it)."""
    host, port = authority, None
    if authority.startswith("["):
        end = authority.find("]")
        if end < 0:
            raise HttpError(400, "capsem proxy: bad authority")
        host, rest = authority[1:end], authority[end + 1:]
        if rest:
            if not rest.startswith(":"):
                raise HttpError(400, "capsem proxy: bad authority")
            port = rest[1:]
    elif authority.count(":") == 1:
        host, port = authority.split(":")
    if port is None or port == "":
        if default_port is None:
            raise HttpError(400, "capsem proxy: CONNECT needs host:port")
        port = default_port
    try:
        port = int(port)
    except ValueError:
        raise HttpError(400, "capsem proxy: bad port") from None
    if not host or not 0 < port < 65536 or len(host) > 253:
        raise HttpError(400, "capsem proxy: bad authority")
    return host, port


def absolute_target(req: Request) -> tuple[str, int, str, str]:
    """(host, port, origin-form target, Host header value) of an absolute-form request."""
    try:
        url = urlsplit(req.target)
    except ValueError:
        raise HttpError(400, "capsem proxy: bad URL") from None
    scheme = url.scheme.lower()
    if scheme not in ("http", "ws"):
        if not scheme:
            raise HttpError(400, "capsem proxy: this is a proxy; send absolute-form requests or CONNECT")
        raise HttpError(501, f"capsem proxy: {scheme}:// is not proxied here (https goes through CONNECT)")
    netloc = url.netloc.rpartition("@")[2]  # userinfo never goes out
    host, port = parse_authority(netloc, 80)
    path = url.path or "/"
    if url.query:
        path += "?" + url.query
    return host, port, path, netloc


def body_kind(req: Request) -> tuple[str, int]:
    """("none"|"length"|"chunked", length) of a request body."""
    te = req.values("transfer-encoding")
    cl = req.values("content-length")
    if te:
        if cl:
            raise HttpError(400, "capsem proxy: both Transfer-Encoding and Content-Length")
        codings = [t.strip().lower() for v in te for t in v.split(",")]
        if codings[-1] != "chunked":
            raise HttpError(400, "capsem proxy: request body cannot be delimited")
        return "chunked", 0
    if cl:
        if len(set(cl)) != 1 or not cl[0].isdigit() or len(cl[0]) > 18:
            raise HttpError(400, "capsem proxy: bad Content-Length")
        return "length", int(cl[0])
    return "none", 0


def origin_head(req: Request, path: str, host_header: str) -> bytes:
    lines = [f"{req.method} {path} {req.version}", f"Host: {host_header}"]
    for name, value in req.headers:
        low = name.lower()
        if low in HOP_BY_HOP or low == "host":
            continue
        lines.append(f"{name}: {value}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def copy_chunked(reader: ClientReader, dst: socket.socket) -> None:
    while True:
        line = reader.line()
        size_text = line.split(b";", 1)[0].strip()
        try:
            size = int(size_text, 16)
        except ValueError:
            raise HttpError(400, "capsem proxy: bad chunk size") from None
        dst.sendall(line)
        if size == 0:
            while True:  # trailers, then the blank line
                trailer = reader.line()
                dst.sendall(trailer)
                if trailer == b"\r\n":
                    return
        reader.copy(size, dst)
        end = reader.line()
        if end != b"\r\n":
            raise HttpError(400, "capsem proxy: bad chunk end")
        dst.sendall(end)


# --- one client connection --------------------------------------------------------------------------

class Upstream:
    """One egress stream and the thread copying its bytes back to the client."""

    def __init__(self, key: tuple[str, int], sock: socket.socket, client: socket.socket):
        self.key = key
        self.sock = sock
        self.client = client
        self.detached = False
        self.activity = egress_stream.Activity()
        self.thread = egress_stream.start_thread(self._back)

    def _back(self) -> None:
        buf = bytearray(egress_stream.CHUNK)
        view = memoryview(buf)
        try:
            while True:
                n = self.sock.recv_into(buf)
                if not n:
                    break
                self.activity.touch()
                self.client.sendall(view[:n])
        except OSError:
            pass
        if not self.detached:  # the server ended: so does the client connection
            try:
                self.client.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def finish(self) -> None:
        """The client is done sending: pass that on, let the response finish (while it moves),
        then close."""
        try:
            self.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        egress_stream.wait_quiet(self.thread, self.activity, self.sock)
        self.close()

    def close(self) -> None:
        self.detached = True
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.thread.join(5)
        self.sock.close()


def _open(host: str, port: int, client: socket.socket) -> socket.socket | None:
    try:
        return egress_stream.open_stream(host, port)
    except egress_stream.Refused as exc:
        client.sendall(refusal(f"{host}:{port}", exc))
    except (OSError, ConnectionError) as exc:
        client.sendall(response(502, f"capsem proxy: cannot reach the host's egress proxy: {exc}\n"))
    return None


def handle(client: socket.socket) -> None:
    ClientConnection(client).serve()


class ClientConnection:
    """One client connection: its requests in turn, over one upstream stream per host:port."""

    def __init__(self, client: socket.socket):
        self.client = client
        self.reader = ClientReader(client)
        self.up: Upstream | None = None
        self.first = True  # no request forwarded yet

    def serve(self) -> None:
        try:
            while self._serve_one():
                pass
        except (OSError, ConnectionError):
            return
        finally:
            self._drop_upstream()

    def _serve_one(self) -> bool:
        """Read, check and forward one request; False once the connection is done."""
        try:
            head = self.reader.head(FIRST_TIMEOUT if self.first else IDLE_TIMEOUT)
            if head is None:
                self._finish_upstream()
                return False
            req = parse_head(head)
            if req.method == "CONNECT":
                self._connect(req)
                return False
            host, port, path, host_header = absolute_target(req)
            kind, length = body_kind(req)
        except HttpError as exc:
            if self.up is None or self.first:  # nothing forwarded: the client gets the error
                self.client.sendall(response(exc.status, exc.text + "\n"))
            return False
        up = self._upstream_for(host, port)
        if up is None:
            return False
        self.first = False
        try:
            return self._forward(up, req, path, host_header, kind, length)
        except HttpError:
            return False  # mid-request: the upstream has a partial request; just end both

    def _connect(self, req: Request) -> None:
        """CONNECT host:port: the connection becomes a tunnel to it."""
        host, port = parse_authority(req.target, None)
        self._drop_upstream()
        _tunnel(self.client, self.reader, host, port)

    def _upstream_for(self, host: str, port: int) -> Upstream | None:
        """The upstream stream if it goes to host:port, else a new one in its place; None if
        refused or unreachable (the client got the 403 or 502)."""
        if self.up is not None and self.up.key == (host, port):
            return self.up
        self._drop_upstream()
        sock = _open(host, port, self.client)
        if sock is None:
            return None
        self.up = Upstream((host, port), sock, self.client)
        return self.up

    def _forward(self, up: Upstream, req: Request, path: str, host_header: str, kind: str, length: int) -> bool:
        """The request in origin-form, then its body (or, for an upgrade, every byte both ways
        until either side ends: the connection is done then)."""
        up.sock.sendall(origin_head(req, path, host_header))
        if "upgrade" in req.tokens("connection"):
            self.client.settimeout(None)  # a websocket may idle; the host bounds idle streams
            if self.reader.buf:
                up.sock.sendall(self.reader.take())
            egress_stream.pump(self.client, up.sock)
            egress_stream.wait_quiet(up.thread, up.activity, up.sock)
            return False
        if kind == "length":
            self.reader.copy(length, up.sock)
        elif kind == "chunked":
            copy_chunked(self.reader, up.sock)
        return True

    def _finish_upstream(self) -> None:
        """The client ended its input: let the upstream's response finish, then close it."""
        if self.up is not None:
            self.up.finish()
            self.up = None

    def _drop_upstream(self) -> None:
        if self.up is not None:
            self.up.close()
            self.up = None


def _tunnel(client: socket.socket, reader: ClientReader, host: str, port: int) -> None:
    sock = _open(host, port, client)
    if sock is None:
        return
    try:
        client.settimeout(None)
        client.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
        early = reader.take()
        if early:
            sock.sendall(early)
        egress_stream.splice(client, sock)
    finally:
        sock.close()


def start(host: str = HOST, port: int = PORT) -> egress_stream.Server:
    return egress_stream.Server(egress_stream.tcp_listener(host, port), handle, name="http-proxy").start()

