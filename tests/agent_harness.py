"""Host-side harness for the guest agent tests (no tests here; imported by test_agent_*.py; the
`agent` fixture of conftest.py is an `Agent`).

Runs the REAL agent (`python -I guest-agent/capsem-agent`, as /init does, minus PID 1) with its
control connection pointed at a Unix socket the test listens on, and its channel listener on a
Unix socket too, so the whole agent runs on the host.
"""

from __future__ import annotations

import base64
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from capsem_agent import protocol

ROOT = Path(__file__).resolve().parents[1]
LAUNCHER = ROOT / "guest-agent" / "capsem-agent"


class AgentClient:
    """A blocking client for the control protocol with a backlog for out-of-order messages."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.decoder = protocol.FrameDecoder()
        self.backlog: list[dict] = []

    def send(self, msg: dict) -> None:
        self.sock.sendall(protocol.encode(msg))

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _read_more(self, deadline: float) -> bool:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("no message from the agent in time")
        self.sock.settimeout(remaining)
        data = self.sock.recv(1 << 20)
        if not data:
            return False
        for body in self.decoder.feed(data):
            self.backlog.append(json.loads(body))
        return True

    def recv(self, pred=lambda m: True, timeout: float = 30.0) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            for i, m in enumerate(self.backlog):
                if pred(m):
                    return self.backlog.pop(i)
            if not self._read_more(deadline):
                raise EOFError("agent closed the control connection")

    def reply(self, msg_id: int, timeout: float = 30.0) -> dict:
        return self.recv(lambda m: m.get("id") == msg_id and m["t"] not in ("out", "exit", "started")
                         or (m.get("id") == msg_id and m["t"] == "error"), timeout)

    def request(self, msg: dict, timeout: float = 30.0) -> dict:
        self.send(msg)
        return self.reply(msg["id"], timeout)

    def run(self, msg_id: int, argv, timeout: float = 60.0, **kw) -> tuple[dict, bytes, bytes]:
        """exec and collect everything: (exit message, stdout, stderr)."""
        self.send({"t": "exec", "id": msg_id, "argv": argv, **kw})
        started = self.recv(lambda m: m.get("id") == msg_id, timeout)
        assert started["t"] == "started", started
        return self.collect(msg_id, timeout)

    def collect(self, msg_id: int, timeout: float = 60.0):
        out = {1: bytearray(), 2: bytearray()}
        deadline = time.monotonic() + timeout
        while True:
            m = self.recv(lambda m: m.get("id") == msg_id, max(0.01, deadline - time.monotonic()))
            if m["t"] == "out":
                out[m["fd"]] += base64.b64decode(m["data"])
            elif m["t"] == "exit":
                return m, bytes(out[1]), bytes(out[2])
            else:
                raise AssertionError(f"unexpected message {m}")


class Agent:
    def __init__(self, tmp: Path, extra_env: dict | None = None):
        self.tmp = tmp
        self.control_path = str(tmp / "ctl.sock")
        self.channels_path = str(tmp / "chan.sock")
        self.rundir = tmp / "run"
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(self.control_path)
        self.listener.listen(1)
        env = dict(os.environ)
        env.update({
            "CAPSEM_AGENT_CONNECT": f"unix:{self.control_path}",
            "CAPSEM_AGENT_CHANNELS_LISTEN": f"unix:{self.channels_path}",
            "CAPSEM_AGENT_RUNDIR": str(self.rundir),
        })
        env.update(extra_env or {})
        self.stderr_path = tmp / "agent.stderr"
        self.proc = subprocess.Popen([sys.executable, "-I", str(LAUNCHER)], env=env,
                                     stderr=open(self.stderr_path, "wb"))
        self.listener.settimeout(30)
        conn, _ = self.listener.accept()
        self.client = AgentClient(conn)
        self.hello = self.client.recv(timeout=30)

    def rss_kib(self) -> int:
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        raise AssertionError("no VmRSS")

    def hwm_kib(self) -> int:
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
        raise AssertionError("no VmHWM")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                self.client.send({"t": "shutdown", "id": 999999})
                self.proc.wait(10)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()
        self.client.sock.close()
        self.listener.close()


def closed_by_agent(s: socket.socket, timeout: float = 30.0) -> bool:
    """The agent closed this stream within `timeout` (an unread greeting makes it a reset)."""
    s.settimeout(timeout)
    try:
        return s.recv(100) == b""
    except ConnectionResetError:
        return True


def open_channel(agent: Agent, name: str) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(agent.channels_path)
    s.sendall(protocol.encode({"t": "channel", "name": name}))
    return s


class ChannelForwarder:
    """What the host runner does: a local TCP port per kernel channel, each accepted connection
    becomes one stream to the agent's channel listener starting with the channel frame."""

    def __init__(self, channels_path: str):
        self.channels_path = channels_path
        self.ports: dict[str, int] = {}
        self._listeners = []
        self._streams: list[socket.socket] = []  # every accepted and forwarded socket, closed by close()
        self._stop = False
        for name in protocol.KERNEL_CHANNELS:
            ls = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            ls.bind(("127.0.0.1", 0))
            ls.listen(16)
            self.ports[name] = ls.getsockname()[1]
            self._listeners.append(ls)
            threading.Thread(target=self._accept, args=(ls, name), daemon=True).start()

    def _accept(self, ls, name):
        while not self._stop:
            try:
                c, _ = ls.accept()
            except OSError:
                return
            c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            u = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                u.connect(self.channels_path)
                u.sendall(protocol.encode({"t": "channel", "name": name}))
            except OSError:
                c.close()
                u.close()
                continue
            self._streams += [c, u]
            for a, b in ((c, u), (u, c)):
                threading.Thread(target=_pump, args=(a, b), daemon=True).start()

    def connection_info(self, key: str) -> dict:
        info = {f"{n}_port": p for n, p in self.ports.items()}
        info.update(ip="127.0.0.1", transport="tcp", key=key, signature_scheme="hmac-sha256")
        return info

    def close(self):
        # why shutdown first: close() alone does not wake a thread blocked in accept() or recv(),
        # and the threads and sockets would then outlive the test (each test leaked ten sockets)
        self._stop = True
        for s in self._listeners + self._streams:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()


def _pump(a, b):
    try:
        while True:
            d = a.recv(65536)
            if not d:
                break
            b.sendall(d)
        b.shutdown(socket.SHUT_WR)
    except OSError:
        for s in (a, b):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
