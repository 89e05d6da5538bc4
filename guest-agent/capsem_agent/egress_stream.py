"""Egress streams to the host (vsock port 5002): one per outgoing TCP connection of the guest.

    sock = open_stream("pypi.org", 443)   # connected: raw bytes follow both ways
    # raises Refused(reason, rule) when the host's policy says no, OSError when it cannot ask
    splice(client, sock)                  # copy both ways until both directions are done

Also the small threaded server the local listeners share (capture, HTTP proxy, DNS over TCP):
every connection gets its own thread with a small stack, and the number of them is bounded.
Blocking sockets and threads, like the channel relay: the lowest per-byte cost Python offers,
and a blocking sendall is natural flow control.
"""

from __future__ import annotations

import os
import socket
import struct
import threading
import time

from . import protocol, transport

ENV_EGRESS = "CAPSEM_AGENT_EGRESS"  # host-side tests: unix:/path/of/the/bridge's/5002/socket
CONNECT_TIMEOUT = 10.0   # reaching the host's vsock listener
REPLY_TIMEOUT = 80.0     # the host may take 10 s to reach its proxy, 60 s more for the upstream
REPLY_MAX = 8192
CHUNK = 64 * 1024
MAX_STREAMS = 256        # the host bridge allows 256 concurrent streams per VM
LINGER = 10.0            # after the client's EOF, how long the host's answer may be silent
_STACK = 256 * 1024
_stack_lock = threading.Lock()


class Refused(Exception):
    """The host refused the connection: its policy (or a limit) said no."""

    def __init__(self, reason: str, rule: str):
        super().__init__(reason)
        self.reason = reason
        self.rule = rule


def address() -> str:
    return os.environ.get(ENV_EGRESS) or f"vsock:{protocol.HOST_CID}:{protocol.PORT_EGRESS}"


def recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("the host closed the stream")
        buf += chunk
    return bytes(buf)


def open_stream(host: str, port: int, early: bytes = b"", timeout: float = REPLY_TIMEOUT) -> socket.socket:
    """A connected egress stream to host:port (host: a name or an IP literal, as the program asked)."""
    family, target = transport._parse(address())
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.settimeout(CONNECT_TIMEOUT)
        sock.connect(target)
        sock.sendall(protocol.encode({"t": "connect", "host": host, "port": port}) + early)
        sock.settimeout(timeout)
        try:
            msg = protocol.recv_message(sock, REPLY_MAX)
        except EOFError:
            raise ConnectionError("the host closed the stream") from None
        except protocol.FrameError as exc:
            raise ConnectionError(f"the host answered a bad frame: {exc}") from None
        except protocol.MessageError as exc:
            raise ConnectionError(f"the host's answer is not a message: {exc}") from None
        if msg["t"] == "connected":
            sock.settimeout(None)
            return sock
        if msg["t"] == "refused":
            raise Refused(str(msg.get("reason") or "refused")[:1000], str(msg.get("rule") or "")[:200])
        raise ConnectionError(f"unexpected answer {msg['t'][:40]!r} from the host")
    except BaseException:
        sock.close()
        raise


def reset(sock: socket.socket) -> None:
    """Close with a TCP RST (SO_LINGER 0): the program sees ECONNRESET at once."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    sock.close()


class Activity:
    """When bytes last moved (one direction of a relay)."""

    def __init__(self):
        self.t = time.monotonic()

    def touch(self) -> None:
        self.t = time.monotonic()

    def idle(self) -> float:
        return time.monotonic() - self.t


def pump(src: socket.socket, dst: socket.socket, activity: Activity | None = None) -> None:
    """Copy src -> dst; pass a clean end on as a half-close, a broken one as a full shutdown."""
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    try:
        while True:
            n = src.recv_into(buf)
            if not n:
                break
            if activity is not None:
                activity.touch()
            dst.sendall(view[:n])
        dst.shutdown(socket.SHUT_WR)
    except OSError:
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def wait_quiet(thread: threading.Thread, activity: Activity, stream: socket.socket,
               linger: float | None = None) -> None:
    """The client is done sending: let the host's answer (copied by `thread`) finish, but end
    `stream` once the answer has been silent for `linger` s. Why: the vsock backend
    (vhost-device-vsock) drops half-closes, so the host never learns the client is gone and would
    hold the stream until its own timeouts."""
    linger = LINGER if linger is None else linger
    while thread.is_alive():
        thread.join(min(1.0, linger))
        if thread.is_alive() and activity.idle() > linger:
            try:
                stream.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            thread.join(5)
            return


def splice(a: socket.socket, b: socket.socket, linger: float | None = None) -> None:
    """Relay client `a` <-> host stream `b` until both directions ended (or one broke); once `a`
    has ended, `b` gets `linger` s of silence at most (wait_quiet). Closes neither socket."""
    activity = Activity()
    back = start_thread(pump, b, a, activity)
    pump(a, b)
    wait_quiet(back, activity, b, linger)


def start_thread(target, *args) -> threading.Thread:
    with _stack_lock:
        old = threading.stack_size(_STACK)
        try:
            t = threading.Thread(target=target, args=args, daemon=True)
            t.start()
        finally:
            threading.stack_size(old)
    return t


def tcp_listener(host: str, port: int, backlog: int = 128) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(backlog)
    return sock


class Server:
    """Accept connections on `listener` and run handler(sock) in a thread each, at most `limit`
    at once (beyond that new connections are reset: bounded threads whatever the guest does)."""

    def __init__(self, listener: socket.socket, handler, limit: int = MAX_STREAMS, name: str = "server"):
        self.listener = listener
        self.handler = handler
        self.name = name
        self._slots = threading.BoundedSemaphore(limit)
        self.closed = False

    def start(self) -> "Server":
        start_thread(self._accept_loop)
        return self

    def close(self) -> None:
        self.closed = True
        try:
            self.listener.close()
        except OSError:
            pass

    def _accept_loop(self) -> None:
        while not self.closed:
            try:
                sock, _ = self.listener.accept()
            except OSError:
                if self.closed:
                    return
                time.sleep(0.05)  # EMFILE and friends: do not spin
                continue
            if not self._slots.acquire(blocking=False):
                reset(sock)
                continue
            try:
                start_thread(self._serve, sock)
            except RuntimeError:
                reset(sock)
                self._slots.release()

    def _serve(self, sock: socket.socket) -> None:
        try:
            # why: relayed responses arrive in pieces (TLS records); with Nagle, a small piece
            # waits for the client's delayed ACK (~40 ms per request)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.handler(sock)
        except Exception as exc:  # noqa: BLE001 - one bad connection must not stop the server
            from .sysinit import log
            log(f"{self.name}: {exc.__class__.__name__}: {exc}")
        finally:
            try:
                sock.close()
            except OSError:
                pass
            self._slots.release()
