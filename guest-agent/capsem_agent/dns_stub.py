"""The guest's resolver: 127.0.0.1:53 (UDP and TCP), every query answered by the host (vsock 5003).

All queries share one persistent stream to the host, which answers in order (protocol.py). The
stub keeps a bounded FIFO of queries in flight; an answer that does not come within
QUERY_TIMEOUT tears the stream down (everything in flight gets SERVFAIL) and the next query opens
a new one. When the host cannot be reached the client gets SERVFAIL at once, never a silent wait.
"""

from __future__ import annotations

import collections
import os
import socket
import struct
import threading
import time

from . import egress_stream, protocol, transport

ENV_DNS = "CAPSEM_AGENT_DNS"  # host-side tests: unix:/path
HOST, PORT = "127.0.0.1", 53
QUERY_MAX = 1024        # the host's limit too
ANSWER_MAX = 8192
MAX_IN_FLIGHT = 128
QUERY_TIMEOUT = 5.0
CONNECT_TIMEOUT = 3.0
TCP_IDLE = 10.0
TCP_CLIENTS = 16
SERVFAIL, FLAG_QR, FLAG_TC, FLAG_RA = 2, 0x8000, 0x0200, 0x0080


def address() -> str:
    return os.environ.get(ENV_DNS) or f"vsock:{protocol.HOST_CID}:{protocol.PORT_DNS}"


# --- tiny DNS helpers (the host does the real parsing) ----------------------------------------------

def question_end(msg: bytes) -> int | None:
    """Offset just past the (single) question, or None if there is none or it is malformed."""
    if len(msg) < 12 or struct.unpack_from("!H", msg, 4)[0] != 1:
        return None
    i = 12
    while i < len(msg):
        n = msg[i]
        if n == 0:
            return i + 5 if i + 5 <= len(msg) else None
        if n & 0xC0:
            return None  # no compression in a question we accept
        i += 1 + n
    return None


def error_answer(query: bytes, rcode: int = SERVFAIL, flags_extra: int = 0) -> bytes | None:
    """An answer with `rcode` and the query's question (None if the query has no usable header)."""
    if len(query) < 12:
        return None
    qid, flags = struct.unpack_from("!HH", query)
    end = question_end(query)
    question = query[12:end] if end else b""
    flags = FLAG_QR | FLAG_RA | (flags & 0x7900) | flags_extra | rcode  # keep opcode and RD
    return struct.pack("!HHHHHH", qid, flags, 1 if question else 0, 0, 0, 0) + question


def udp_limit(query: bytes) -> int:
    """Largest answer a UDP client takes: 512 unless it sent EDNS (then a safe 1232)."""
    return 1232 if len(query) >= 12 and struct.unpack_from("!H", query, 10)[0] > 0 else 512


# --- the stream to the host -------------------------------------------------------------------------

class Forwarder:
    def __init__(self, addr: str | None = None, max_in_flight: int = MAX_IN_FLIGHT,
                 timeout: float = QUERY_TIMEOUT):
        self.addr = addr
        self.max_in_flight = max_in_flight
        self.timeout = timeout
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._pending: collections.deque = collections.deque()  # (deliver, deadline, query)

    def submit(self, query: bytes, deliver) -> None:
        """Ask the host; deliver(answer) is called once (from another thread, or right here)."""
        if len(query) < 12 or len(query) > QUERY_MAX:
            return
        failed = []
        with self._lock:
            if len(self._pending) >= self.max_in_flight:
                failed = [(deliver, query)]
            else:
                entry = (deliver, time.monotonic() + self.timeout, query)
                try:
                    if self._sock is None:
                        self._connect()
                    self._pending.append(entry)
                    self._sock.sendall(protocol.encode({"t": "dns", "data": protocol.b64(query)}))
                except OSError:
                    failed = self._reset_locked(self._sock)
                    if entry not in self._pending and (deliver, query) not in failed:
                        failed.append((deliver, query))
        self._fail(failed)

    def _connect(self) -> None:
        family, target = transport._parse(self.addr or address())
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.settimeout(CONNECT_TIMEOUT)
        try:
            sock.connect(target)
        except OSError:
            sock.close()
            raise
        sock.settimeout(1.0)  # the reader wakes up to check deadlines; sends are tiny
        self._sock = sock
        egress_stream.start_thread(self._read_loop, sock)

    def _reset_locked(self, sock) -> list:
        """Drop `sock` if it is still current; returns the (deliver, query) pairs to fail."""
        if sock is None or self._sock is not sock:
            return []
        self._sock = None
        try:
            sock.close()
        except OSError:
            pass
        failed = [(p[0], p[2]) for p in self._pending]
        self._pending.clear()
        return failed

    def _reset(self, sock) -> None:
        with self._lock:
            failed = self._reset_locked(sock)
        self._fail(failed)

    @staticmethod
    def _fail(entries) -> None:
        for deliver, query in entries:
            try:
                deliver(error_answer(query))
            except Exception:  # noqa: BLE001
                pass

    def _read_loop(self, sock: socket.socket) -> None:
        decoder = protocol.FrameDecoder(max_frame=ANSWER_MAX)
        while True:
            try:
                data = sock.recv(65536)
            except socket.timeout:
                with self._lock:
                    late = self._sock is sock and self._pending and self._pending[0][1] < time.monotonic()
                if late:
                    self._reset(sock)
                    return
                if self._sock is not sock:
                    return
                continue
            except OSError:
                self._reset(sock)
                return
            if not data:
                self._reset(sock)
                return
            try:
                bodies = decoder.feed(data)
                msgs = [protocol.decode_body(b) for b in bodies]
            except (protocol.FrameError, protocol.MessageError):
                self._reset(sock)
                return
            for msg in msgs:
                with self._lock:
                    if self._sock is not sock or not self._pending:
                        entry = None
                    else:
                        entry = self._pending.popleft()
                if entry is None:
                    self._reset(sock)
                    return
                deliver, _, query = entry
                answer = None
                if msg.get("t") == "dns" and not msg.get("drop"):
                    try:
                        answer = protocol.req_data(msg, "data")
                    except protocol.MessageError:
                        answer = None
                    if answer is not None and (len(answer) < 12 or answer[:2] != query[:2]):
                        answer = None  # not the answer to this query: say nothing rather than lie
                try:
                    deliver(answer)
                except Exception:  # noqa: BLE001
                    pass


# --- the local listeners ------------------------------------------------------------------------

class UdpServer:
    def __init__(self, forwarder: Forwarder, host: str = HOST, port: int = PORT):
        self.forwarder = forwarder
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((host, port))

    def start(self) -> "UdpServer":
        egress_stream.start_thread(self._loop)
        return self

    def _loop(self) -> None:
        while True:
            try:
                query, addr = self.sock.recvfrom(QUERY_MAX + 1)
            except OSError:
                if self.sock.fileno() < 0:
                    return
                time.sleep(0.05)
                continue
            self.forwarder.submit(query, lambda ans, q=query, a=addr: self._answer(q, a, ans))

    def _answer(self, query: bytes, addr, answer: bytes | None) -> None:
        if answer is None:
            return
        if len(answer) > udp_limit(query):
            answer = error_answer(query, 0, FLAG_TC)  # truncated: the client retries over TCP
        try:
            self.sock.sendto(answer, addr)
        except OSError:
            pass

    def close(self) -> None:
        self.sock.close()


def _tcp_client(forwarder: Forwarder, client: socket.socket) -> None:
    client.settimeout(TCP_IDLE)
    while True:
        try:
            (n,) = struct.unpack("!H", egress_stream.recv_exact(client, 2))
            if not 12 <= n <= QUERY_MAX:
                return
            query = egress_stream.recv_exact(client, n)
        except (OSError, ConnectionError):
            return
        done = threading.Event()
        box = []

        def deliver(answer, box=box, done=done):
            box.append(answer)
            done.set()
        forwarder.submit(query, deliver)
        done.wait(forwarder.timeout + 2)
        answer = box[0] if box and box[0] is not None else error_answer(query)
        try:
            client.sendall(struct.pack("!H", len(answer)) + answer)
        except OSError:
            return


def start(forwarder: Forwarder | None = None, host: str = HOST, port: int = PORT):
    """Serve UDP and TCP on host:port; returns (forwarder, udp server, tcp server)."""
    forwarder = forwarder or Forwarder()
    udp = UdpServer(forwarder, host, port).start()
    tcp = egress_stream.Server(egress_stream.tcp_listener(host, port),
                               lambda c: _tcp_client(forwarder, c), limit=TCP_CLIENTS, name="dns-tcp").start()
    return forwarder, udp, tcp
