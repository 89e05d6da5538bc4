"""Channel relay: host streams on vsock port 5001 <-> the kernel's TCP ports on 127.0.0.1.

Plain blocking sockets and two threads per stream rather than asyncio: a byte arriving wakes the
thread blocked in recv and goes straight out in sendall, with no event-loop hop in between; that
is the lowest latency Python offers, and the blocking sendall is natural flow control (a stalled
reader stalls the writer; buffers stay at one CHUNK per direction). The copy loop is
egress_stream.pump, shared with the egress streams.
"""

from __future__ import annotations

import json
import socket
import threading
import time

from . import protocol
from .egress_stream import pump, recv_exact
from .ipykernel_host import connect_local, hung_up, shut

HELLO_TIMEOUT = 10.0  # the first frame must arrive promptly
MAX_HELLO = 4096
CONNECT_WAIT = 120.0  # the kernel may still be importing ipykernel (seconds under TCG)
PRIMED_CHECK = 30.0  # how often a primed stream waiting for its kernel's key checks that the host kept it
MAX_STREAMS = 64
_STACK = 256 * 1024


def _log(msg: str) -> None:
    from .sysinit import log
    log(msg)


def read_channel_frame(sock: socket.socket) -> tuple[str, bool]:
    """Read exactly the first frame (no over-read: ZMTP bytes may follow right behind it): the
    channel's name, and whether the host primes the stream (protocol.ZMTP_GREETING follows)."""
    msg = protocol.recv_message(sock, MAX_HELLO)
    name = msg.get("name")
    prime = msg.get("prime", False)
    if msg["t"] != "channel" or name not in protocol.KERNEL_CHANNELS or not isinstance(prime, bool):
        raise protocol.MessageError("first frame must be {t: channel, name: <kernel channel>[, prime: bool]}")
    return name, prime


class ChannelServer:
    def __init__(self, listener: socket.socket, kernels):
        self._listener = listener
        self._kernels = kernels  # ipykernel_host.IPyKernelHost: .current, .prime()
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
            name, prime = read_channel_frame(sock)
            if prime:
                self._serve_primed(sock, name)
                return
            kernel = self._kernels.current
            if kernel is None:
                return
            tcp = self._connect(kernel, name)
            if tcp is None or not kernel.add_relay(sock):
                return
            sock.settimeout(None)
            back = threading.Thread(target=pump, args=(tcp, sock), daemon=True)
            back.start()
            pump(sock, tcp)
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

    def _serve_primed(self, sock: socket.socket, name: str) -> None:
        """A pooled VM's host opens one stream per channel before the claim and sends the ZMTP
        greeting a front end would send (protocol.py). Joined to the pre-started kernel's spare
        connection now, the kernel's side of the handshake is done before the claim: the front
        end's first connection then needs no round trip to the guest to get through it. Host
        bytes after the greeting wait until the kernel took its real key (SpareConnections.ready)."""
        primed = self._kernels.prime(name)
        if primed is None:
            return  # no warm pre-started kernel, or a kernel was started already: the host opens a plain stream later
        spare, spares = primed
        try:
            spare.sendall(recv_exact(sock, len(protocol.ZMTP_GREETING)))
            if not spares.add_relay(sock, spare):
                return
            sock.settimeout(None)
            back = threading.Thread(target=pump, args=(spare, sock), daemon=True)
            back.start()
            while not spares.ready.wait(PRIMED_CHECK):
                if hung_up(sock):  # the pooled VM's host is gone
                    shut(sock, spare)
                    break
            if spares.ready.is_set() and not spares.closed:
                pump(sock, spare)
            back.join()
        finally:
            spares.remove_relay(sock)
            spare.close()

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
