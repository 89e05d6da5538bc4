"""Channel relay: host streams on vsock port 5001 <-> the kernel's TCP ports on 127.0.0.1.

Plain blocking sockets and two threads per stream rather than asyncio: a byte arriving wakes the
thread blocked in recv and goes straight out in sendall, with no event-loop hop in between; that
is the lowest latency Python offers, and the blocking sendall is natural flow control (a stalled
reader stalls the writer; buffers stay at one CHUNK per direction).
"""

from __future__ import annotations

import json
import socket
import threading
import time

from . import protocol
from .kernel import connect_local, hung_up

CHUNK = 64 * 1024
HELLO_TIMEOUT = 10.0  # the first frame must arrive promptly
MAX_HELLO = 4096
CONNECT_WAIT = 120.0  # the kernel may still be importing ipykernel (seconds under TCG)
EARLY_CHECK = 30.0  # how often a stream waiting for the first kernel checks that the host kept it
MAX_STREAMS = 64
_STACK = 256 * 1024


def _log(msg: str) -> None:
    from .sysinit import log
    log(msg)


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise EOFError
        buf += chunk
    return bytes(buf)


def read_channel_name(sock: socket.socket) -> str:
    """Read exactly the first frame (no over-read: ZMTP bytes may follow right behind it)."""
    (length,) = protocol.HEADER.unpack(_recv_exact(sock, protocol.HEADER.size))
    if not 0 < length <= MAX_HELLO:
        raise protocol.FrameError(f"channel frame length {length}")
    msg = protocol.decode_body(_recv_exact(sock, length))
    name = msg.get("name")
    if msg["t"] != "channel" or name not in protocol.KERNEL_CHANNELS:
        raise protocol.MessageError("first frame must be {t: channel, name: <kernel channel>}")
    return name


def _pump(src: socket.socket, dst: socket.socket) -> None:
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    try:
        while True:
            n = src.recv_into(buf)
            if not n:
                break
            dst.sendall(view[:n])
        dst.shutdown(socket.SHUT_WR)  # pass the half-close on; the other direction may go on
    except OSError:
        for s in (src, dst):  # one side broke: end both directions
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


class ChannelServer:
    def __init__(self, listener: socket.socket, kernels):
        self._listener = listener
        self._kernels = kernels  # kernel.KernelManager: .current, .started
        self._slots = threading.BoundedSemaphore(MAX_STREAMS)

    def start(self) -> None:
        threading.Thread(target=self._accept_loop, name="channels", daemon=True).start()

    def _accept_loop(self) -> None:
        while True:
            try:
                sock, _ = self._listener.accept()
            except OSError as exc:
                _log(f"channel accept failed: {exc}")
                time.sleep(0.1)
                continue
            if not self._slots.acquire(blocking=False):
                sock.close()  # bounded: a flood of streams cannot exhaust threads
                continue
            old = threading.stack_size(_STACK)
            try:
                threading.Thread(target=self._serve, args=(sock,), daemon=True).start()
            except RuntimeError:
                sock.close()
                self._slots.release()
            finally:
                threading.stack_size(old)

    def _serve(self, sock: socket.socket) -> None:
        kernel = tcp = None
        try:
            sock.settimeout(HELLO_TIMEOUT)
            name = read_channel_name(sock)
            kernel = self._first_kernel(sock)
            if kernel is None:
                return
            tcp = self._connect(kernel, name)
            if tcp is None or not kernel.add_relay(sock):
                return
            sock.settimeout(None)
            back = threading.Thread(target=_pump, args=(tcp, sock), daemon=True)
            back.start()
            _pump(sock, tcp)
            back.join()
        except (OSError, EOFError, ValueError, json.JSONDecodeError):
            pass  # a bad or vanished peer: just close
        finally:
            if kernel is not None:
                kernel.remove_relay(sock)
            for s in (sock, tcp):
                if s is not None:
                    s.close()
            self._slots.release()

    def _first_kernel(self, sock: socket.socket):
        """The running kernel. A stream that comes before any kernel was started waits for the
        first one while the host keeps it open: a pooled VM's host opens its channel streams
        before the claim, so that none has to be opened (accepted, named, threaded) under the
        claim's clock. Once a kernel was started, a stream with no kernel is closed at once."""
        while not self._kernels.started.wait(EARLY_CHECK):
            if hung_up(sock):
                return None
        return self._kernels.current

    @staticmethod
    def _connect(kernel, name: str) -> socket.socket | None:
        """Connect to the kernel's port for this channel (or take the spare connection made before
        the claim), waiting while the kernel is alive but not ready (a preinit kernel taking its
        key) or not listening yet."""
        deadline = time.monotonic() + CONNECT_WAIT
        if not kernel.ready.wait(CONNECT_WAIT) or not kernel.alive:
            return None
        if (spare := kernel.spares.take(name)) is not None:
            return spare
        port = kernel.ports[name]
        delay = 0.005
        while kernel.alive and time.monotonic() < deadline:
            try:
                return connect_local(port)
            except OSError:
                time.sleep(delay)
                delay = min(delay * 2, 0.1)
        return None
