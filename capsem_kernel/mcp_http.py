"""`capsem mcp --http`: the MCP server over streamable HTTP, one sandbox per MCP session.

    capsem mcp --http [--host 127.0.0.1] [--port 8765] [--token-file F]

- Bound to 127.0.0.1 unless told otherwise. Every HTTP request needs `Authorization: Bearer
  <token>` (compared in constant time; 401 otherwise, before the MCP SDK sees anything): the token
  is read from --token-file (a regular file of this user, not a link, readable by no one else) or
  made fresh and printed once to stderr.
- One SandboxHolder (so one sandbox, started lazily on the first tool call) per MCP session id
  (`Sessions`): closed when the client ends the session (DELETE), after `idle_timeout` s without a
  tool call (the SDK forgets the session then too), and when the server stops. Why not the SDK's
  lifespan hook: in SDK v2 it runs once per app, not per session.
- At most `max_sessions` sessions at once (each is a VM); the SDK refuses the next one.
"""

from __future__ import annotations

import hmac
import logging
import os
import secrets
import stat
import sys
import threading
from typing import Any, Callable

from .mcp_server import IDLE_TIMEOUT, Options, SandboxHolder, build_server

log = logging.getLogger(__name__)

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8765
MAX_SESSIONS = 4          # each session is a VM
SESSION_HEADER = "mcp-session-id"
MIN_TOKEN = 16
MAX_TOKEN = 4096


class TokenError(ValueError):
    pass


def new_token() -> str:
    return secrets.token_urlsafe(32)


def read_token_file(path: str) -> str:
    """The token in `path`: a regular file (not a link) owned by this user, no group/other access."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as exc:
        raise TokenError(f"cannot open the token file {path}: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise TokenError(f"the token file {path} is not a regular file")
        if st.st_uid != os.geteuid():
            raise TokenError(f"the token file {path} is not owned by this user")
        if st.st_mode & 0o077:
            raise TokenError(f"the token file {path} is readable or writable by others "
                             f"(mode {stat.S_IMODE(st.st_mode):o}): chmod 600 it")
        data = os.read(fd, MAX_TOKEN + 1)
    finally:
        os.close(fd)
    token = data.decode("utf-8", "replace").strip()
    if len(data) > MAX_TOKEN or len(token) < MIN_TOKEN or any(c.isspace() or not c.isprintable() for c in token):
        raise TokenError(f"the token in {path} must be one line of {MIN_TOKEN}..{MAX_TOKEN} printable characters")
    return token


def authorized(header: bytes | None, token: bytes) -> bool:
    """`Authorization: Bearer <token>`, the token compared in constant time."""
    if not header or header[:7].lower() != b"bearer ":
        return False
    return hmac.compare_digest(header[7:].strip(), token)


class BearerAuth:
    """ASGI middleware: every HTTP request without the bearer token gets 401, nothing else."""

    def __init__(self, app, token: str):
        self.app = app
        self.token = token.encode("utf-8")

    async def __call__(self, scope, receive, send):
        if scope["type"] in ("http", "websocket"):
            header = next((v for k, v in scope.get("headers", []) if k == b"authorization"), None)
            if not authorized(header, self.token):
                body = b'{"error": "unauthorized: a bearer token is required"}'
                await send({"type": "http.response.start", "status": 401,
                            "headers": [(b"content-type", b"application/json"),
                                        (b"www-authenticate", b'Bearer realm="capsem"'),
                                        (b"content-length", str(len(body)).encode())]})
                await send({"type": "http.response.body", "body": body})
                return
        await self.app(scope, receive, send)


class HandshakeEraOnly:
    """ASGI middleware: only the MCP eras with sessions (the initialize handshake) are served.

    A 2026-07-28 request is self-contained (no Mcp-Session-Id), so it names no session a sandbox
    could belong to. Such requests (the SDK client's `server/discover` probe first) get a JSON-RPC
    "method not found" error, and clients fall back to the handshake, which gives a session id."""

    MAX_BODY = 1 << 20

    def __init__(self, app):
        from mcp_types.version import HANDSHAKE_PROTOCOL_VERSIONS
        self.app = app
        self.versions = {v.encode() for v in HANDSHAKE_PROTOCOL_VERSIONS}

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            version = next((v for k, v in scope.get("headers", []) if k == b"mcp-protocol-version"), None)
            if version is not None and version not in self.versions:
                await self._refuse(receive, send)
                return
        await self.app(scope, receive, send)

    async def _refuse(self, receive, send) -> None:
        import json
        body = bytearray()
        while len(body) <= self.MAX_BODY:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        try:
            request_id = json.loads(body).get("id")
        except (ValueError, AttributeError):
            request_id = None
        if not isinstance(request_id, (int, str)) or isinstance(request_id, bool):
            await send({"type": "http.response.start", "status": 202, "headers": []})
            await send({"type": "http.response.body", "body": b""})
            return
        out = json.dumps({"jsonrpc": "2.0", "id": request_id, "error": {
            "code": -32601, "message": "capsem serves MCP sessions (initialize handshake): one sandbox per session"}}).encode()
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(out)).encode())]})
        await send({"type": "http.response.body", "body": out})


class Sessions:
    """session id -> SandboxHolder. Thread-safe (tools run on the SDK's worker threads)."""

    def __init__(self, factory: Callable[[], Any], idle_timeout: float = IDLE_TIMEOUT):
        self.factory = factory
        self.idle_timeout = idle_timeout
        self._holders: dict[str, SandboxHolder] = {}
        self._lock = threading.Lock()

    def holder_for(self, ctx: Any) -> SandboxHolder:
        headers = getattr(ctx, "headers", None) or {}
        session_id = headers.get(SESSION_HEADER)
        if not session_id:
            raise RuntimeError("no MCP session id on this request")
        with self._lock:
            holder = self._holders.get(session_id)
            if holder is None:
                holder = self._holders[session_id] = SandboxHolder(self.factory, idle_timeout=self.idle_timeout)
            return holder

    def ids(self) -> list[str]:
        with self._lock:
            return list(self._holders)

    def end(self, session_id: str) -> None:
        """The session is over: close its sandbox (blocking: a VM stops)."""
        with self._lock:
            holder = self._holders.pop(session_id, None)
        if holder is not None:
            holder.close()
            log.info("MCP session %s ended: its sandbox is closed", session_id[:64])

    def close_idle(self) -> None:
        """Close (and forget) the sessions whose sandbox was idle for idle_timeout s."""
        for session_id, holder in list(self._items()):
            if holder.close_if_idle():
                self.end(session_id)

    def _items(self):
        with self._lock:
            return list(self._holders.items())

    def close_all(self) -> None:
        for session_id in self.ids():
            self.end(session_id)


class SessionEnd:
    """ASGI middleware: after a DELETE of a session (the client ends it), close its sandbox."""

    def __init__(self, app, sessions: Sessions):
        self.app = app
        self.sessions = sessions

    async def __call__(self, scope, receive, send):
        await self.app(scope, receive, send)
        if scope["type"] == "http" and scope.get("method") == "DELETE":
            session_id = next((v for k, v in scope.get("headers", []) if k == SESSION_HEADER.encode()), None)
            if session_id:
                import anyio.to_thread
                await anyio.to_thread.run_sync(self.sessions.end, session_id.decode("latin-1"))


def _idle_watch(sessions: Sessions, stop: threading.Event) -> None:
    period = max(1.0, min(60.0, sessions.idle_timeout / 10))
    while not stop.wait(period):
        try:
            sessions.close_idle()
        except Exception:  # noqa: BLE001 - a failing close must not end the watcher
            log.exception("closing an idle session's sandbox failed")


def build_app(sessions: Sessions, token: str, host: str, max_sessions: int = MAX_SESSIONS):
    """The ASGI app: bearer auth, then session-end tracking, then the SDK's streamable HTTP app."""
    server = build_server(holder_for=sessions.holder_for)
    idle = sessions.idle_timeout if sessions.idle_timeout > 0 else None
    inner = server.streamable_http_app(host=host, session_idle_timeout=idle, max_sessions=max_sessions)
    return BearerAuth(HandshakeEraOnly(SessionEnd(inner, sessions)), token)


def serve_http(options: Options, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT,
               token_file: str | None = None, max_sessions: int = MAX_SESSIONS) -> int:
    import uvicorn

    from .sandbox import Sandbox

    if token_file:
        try:
            token = read_token_file(token_file)
        except TokenError as exc:
            print(f"capsem: error: {exc}", file=sys.stderr)
            return 2
    else:
        token = new_token()
        print(f"capsem mcp: bearer token (shown once): {token}", file=sys.stderr, flush=True)
    sessions = Sessions(lambda: Sandbox(**options.sandbox_kwargs()), idle_timeout=options.idle_timeout)
    app = build_app(sessions, token, host, max_sessions)
    stop = threading.Event()
    if options.idle_timeout > 0:
        threading.Thread(target=_idle_watch, args=(sessions, stop), name="capsem-mcp-idle", daemon=True).start()
    print(f"capsem mcp: streamable HTTP on http://{host}:{port}/mcp", file=sys.stderr, flush=True)
    try:
        uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="on")).run()
    finally:
        stop.set()
        sessions.close_all()
    return 0
