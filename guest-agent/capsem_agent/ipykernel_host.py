"""Hosts the Jupyter kernel: one ipykernel per VM, bound to guest 127.0.0.1, reached through the relay.

Secrets: the HMAC key is written only to a connection file in a 0700 directory owned by the
kernel's user (so only root and that user can read it); it never appears on a command line.

Start paths:
  cold  `python3 -m ipykernel_launcher -f <file>`: pays the ipykernel import (seconds under TCG).
  warm  a process started earlier (kernel_prewarm, `python3 -m capsem_agent.warm_kernel`) that
        already imported ipykernel and blocks on a pipe for its parameters; kernel_start hands
        them over and it becomes the kernel. It is still our direct child, so waiting and
        signalling work as for a cold kernel.
  preinit  (kernel_prewarm {preinit: true}, pooled VMs; `python3 -m capsem_agent.preinit_kernel`)
        a warm process that went further: the
        kernel is initialised and running (ports bound, shell built, loop started, its first
        messages answered) with a throw-away key in its connection file. kernel_start rewrites the
        file with the real key and sends key, scheme, cwd and env; the kernel's loop sets the
        session's key, changes directory and environment (keeping what the shell's initialisation
        added to it) and acknowledges; until then the relay holds the host's channels (and the
        connections the agent made to the kernel's ports in advance: SpareConnections). The
        reply to kernel_start does not wait for that acknowledgement. Only for a
        kernel running as root (no uid: the shell was built as root) with no PYTHON*/IPYTHON*/
        JUPYTER*/MPL* variables in its env (read during initialisation); otherwise that process is
        discarded and the kernel starts cold.
  held  (kernel_start {hold: true}, preinit only) the key is handed over while the host still
        attaches the notebook folder: the kernel takes key and env at once but stays in / and holds
        every shell request but kernel_info (in order: it handles one at a time; held_requests.py)
        until kernel_release, which changes to the cwd (then existing) and lets them through.
        Control requests (interrupt, shutdown) are never held.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import re
import secrets
import select
import socket
import subprocess
import sys
import threading
from dataclasses import dataclass

from . import procs, protocol
from .kernel_boot import AGENT_ROOT, WARM_MARKER

ENV_PYTHON = "CAPSEM_AGENT_KERNEL_PYTHON"
ENV_RUNDIR = "CAPSEM_AGENT_RUNDIR"
TAIL_BYTES = 8192  # kernel stdout/stderr kept for diagnostics (sent with kernel_exit)
MAX_KEY = 4096
_SCHEME = re.compile(r"^hmac-[a-z0-9]{1,16}$")
CHANNELS = ("shell", "iopub", "stdin", "control", "hb")
WARM_MODULE = "capsem_agent.warm_kernel"
PREINIT_MODULE = "capsem_agent.preinit_kernel"


def _rmtree(path: str) -> None:
    # shutil only here: it imports zlib, bz2 and lzma (with their shared libraries), a noticeable
    # part of the agent's start-up under TCG, for a clean-up that runs when a kernel ends.
    import shutil
    shutil.rmtree(path, ignore_errors=True)


PREINIT_ENV_PREFIXES = ("PYTHON", "IPYTHON", "JUPYTER", "MPL")


def kernel_python() -> str:
    return os.environ.get(ENV_PYTHON) or sys.executable or "/usr/bin/python3"


def bootstrap_argv(module: str, *args: str) -> list[str]:
    """`python3 -m <module> args...` for a warm or preinit process (see bootstrap_env)."""
    return [kernel_python(), "-m", module, *args]


def bootstrap_env(env: dict[str, str]) -> dict[str, str]:
    """The kernel's env plus PYTHONPATH to find capsem_agent, which the bootstrap removes again
    (kernel_boot.forget_launch_path) before the kernel's own code could see it."""
    return {**env, "PYTHONPATH": AGENT_ROOT}


def rundir() -> str:
    return os.environ.get(ENV_RUNDIR) or "/run/capsem"


def free_ports(n: int) -> list[int]:
    """n distinct free TCP ports on 127.0.0.1 (held open together so they differ)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def connect_local(port: int) -> socket.socket:
    """A blocking TCP connection to 127.0.0.1:port with Nagle off (the kernel's channels)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    sock.settimeout(None)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def hung_up(sock: socket.socket) -> bool:
    """The peer closed its side (readable, and nothing but EOF). Bytes waiting are no hang-up."""
    try:
        return bool(select.select([sock], [], [], 0)[0]) and not sock.recv(1, socket.MSG_PEEK)
    except OSError:
        return True


def shut(*socks: socket.socket) -> None:
    """Shut both directions down (wakes threads blocked in recv on them); errors ignored."""
    for sock in socks:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


class SpareConnections:
    """One TCP connection per channel, made to a pre-started kernel's ports while it waits to be
    claimed, so that the host's first stream on each channel finds the kernel's side connected
    and its ZMTP greeting already sent (under emulation the connect, the kernel's accept and its
    greeting took 0.1-0.2 s with all five channels arriving at once). A pooled VM's host primes
    them before the claim (relay.ChannelServer._serve_primed: the ZMTP greeting passes, nothing
    else until `ready`); otherwise the relay pairs one with a host stream once the kernel is
    ready. The kernel has no ZMTP handshake timeout for them (preinit_kernel.py): a pooled VM
    may wait for its claim for hours."""

    def __init__(self):
        self._socks: dict[str, socket.socket] = {}
        self._relays: dict[socket.socket, socket.socket] = {}  # primed host stream -> its spare
        self._lock = threading.Lock()
        self.closed = False
        # set once the kernel that owns them took its real key (Kernel.ready), or when closed
        self.ready = threading.Event()

    def connect(self, ports: dict[str, int]) -> None:
        for name, port in ports.items():
            try:
                sock = connect_local(port)
            except OSError:
                continue  # the relay connects as usual
            with self._lock:
                if self.closed or name in self._socks:
                    sock.close()
                    continue
                self._socks[name] = sock

    def take(self, name: str) -> socket.socket | None:
        """The spare for this channel if it is still open (each is handed out once)."""
        with self._lock:
            sock = self._socks.pop(name, None)
        if sock is None:
            return None
        if hung_up(sock):  # closed by the kernel
            sock.close()
            return None
        return sock

    def add_relay(self, stream: socket.socket, spare: socket.socket) -> bool:
        """A primed host stream joined to one of these spares: shut down with them."""
        with self._lock:
            if self.closed:
                return False
            self._relays[stream] = spare
            return True

    def remove_relay(self, stream: socket.socket) -> None:
        with self._lock:
            self._relays.pop(stream, None)

    def close(self) -> None:
        with self._lock:
            self.closed = True
            socks, self._socks = self._socks, {}
            relays, self._relays = self._relays, {}
        self.ready.set()  # wakes primed relays; they see `closed`
        for sock in socks.values():
            sock.close()
        for pair in relays.items():
            shut(*pair)  # wakes the relay's threads blocked in recv on either side


class Kernel:
    """A running kernel as seen by the relay threads (read from other threads: keep it simple)."""

    def __init__(self, proc: subprocess.Popen, ports: dict[str, int], conn_dir: str, warm: bool,
                 ready: bool = True, spares: "SpareConnections | None" = None):
        self.proc = proc
        self.spares = spares if spares is not None else SpareConnections()
        self.pid = proc.pid
        self.ports = ports
        self.conn_dir = conn_dir
        self.warm = warm
        self.alive = True
        self.listening = False  # known to accept connections already (kernel_start's reply says so)
        self.held_cwd: str | None = None  # kernel_start with hold: the cwd kernel_release changes to
        # set once the kernel may be reached (a preinit kernel: it has taken the real key); the
        # same event its primed relays wait on
        self.ready = self.spares.ready
        if ready:
            self.ready.set()
        self.tail = bytearray()
        self._relays: set[socket.socket] = set()
        self._lock = threading.Lock()

    def add_relay(self, sock: socket.socket) -> bool:
        with self._lock:
            if not self.alive:
                return False
            self._relays.add(sock)
            return True

    def remove_relay(self, sock: socket.socket) -> None:
        with self._lock:
            self._relays.discard(sock)

    def close_relays(self) -> None:
        with self._lock:
            self.alive = False
            relays, self._relays = self._relays, set()
        self.spares.close()  # (its primed relays too)
        self.ready.set()  # wakes relays waiting for it; they see alive is False
        shut(*relays)


@dataclass
class PreinitKernel:
    """What the agent keeps of a pre-initialised kernel process (kernel_prewarm {preinit}) until
    kernel_start takes it; the process itself is IPyKernelHost._warm."""
    ports: dict[str, int]
    conn_dir: str  # its 0700 directory, holding conn_file (throw-away key until kernel_start)
    conn_file: str
    ack_r: int  # read end of the pipe it writes "ok" to once it took the real key
    spares: SpareConnections

    def discard(self) -> None:
        _rmtree(self.conn_dir)
        os.close(self.ack_r)
        self.spares.close()


@dataclass(frozen=True)
class StartRequest:
    """A kernel_start message, validated."""
    key: str
    scheme: str
    cwd: str
    env: dict[str, str]
    uid: int | None
    gid: int | None
    hold: bool

    @classmethod
    def from_message(cls, msg: dict) -> "StartRequest":
        key = protocol.req_str(msg, "key", max_len=MAX_KEY)
        scheme = protocol.req_str(msg, "signature_scheme", max_len=32)
        if not _SCHEME.match(scheme):
            raise protocol.MessageError("kernel_start: unsupported signature_scheme", msg["id"])
        return cls(key=key, scheme=scheme, cwd=protocol.req_str(msg, "cwd"), env=protocol.req_env(msg, "env"),
                   uid=protocol.req_int(msg, "uid", optional=True, lo=0, hi=2**32 - 2),
                   gid=protocol.req_int(msg, "gid", optional=True, lo=0, hi=2**32 - 2),
                   hold=protocol.req_bool(msg, "hold"))


class IPyKernelHost:
    """The agent's side of the one ipykernel of this VM: starts it (cold, warm or preinit; see
    the module's docstring), watches it and reports its exit; the relay reaches it through
    `current` and `prime`."""

    def __init__(self, send):
        self._send = send
        self.current: Kernel | None = None
        self.started = threading.Event()  # set by the first kernel_start: no stream is primed after it
        self._warm: subprocess.Popen | None = None
        self._warm_env: dict[str, str] | None = None
        self._warm_ready: threading.Event | None = None
        self._preinit: PreinitKernel | None = None  # set while _warm is a preinit process
        self._seq = itertools.count(1)
        self._tasks: set[asyncio.Task] = set()

    # --- requests ----------------------------------------------------------------------------
    def prewarm(self, preinit: bool = False) -> int:
        """Start (or keep) a warm process; returns its pid."""
        if self._warm is not None and self._warm.poll() is None:
            if preinit == (self._preinit is not None):
                return self._warm.pid
            self._discard_warm()
        env = self._env(None, {})
        argv = bootstrap_argv(WARM_MODULE)
        self._preinit = None
        if preinit:
            ports = dict(zip(CHANNELS, free_ports(len(CHANNELS))))
            conn_dir, conn_file = self._write_connection_file(ports, secrets.token_hex(32), "hmac-sha256",
                                                              None, None)
            ack_r, ack_w = os.pipe()
            self._preinit = PreinitKernel(ports, conn_dir, conn_file, ack_r, SpareConnections())
            argv = bootstrap_argv(PREINIT_MODULE, conn_file, str(ack_w))
        try:
            self._warm = subprocess.Popen(
                argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd="/",
                env=bootstrap_env(env), start_new_session=True, close_fds=True,
                pass_fds=(ack_w,) if preinit else ())
        finally:
            if preinit:
                os.close(ack_w)
        self._warm_env = env
        self._warm_ready = threading.Event()
        pre = self._preinit
        then = (lambda: pre.spares.connect(pre.ports)) if pre is not None else None  # its ports are bound by then
        threading.Thread(target=_read_marker, args=(self._warm, self._warm_ready, then), daemon=True).start()
        return self._warm.pid

    def prime(self, name: str) -> "tuple[socket.socket, SpareConnections] | None":
        """For a primed host stream (relay.ChannelServer._serve_primed): the pre-started kernel's
        spare connection for this channel and the spares it belongs to, while no kernel was
        started and the pre-started kernel is warm (its spares are connected by then)."""
        pre, warm_ready = self._preinit, self._warm_ready
        if self.started.is_set() or pre is None or warm_ready is None or not warm_ready.is_set():
            return None
        spare = pre.spares.take(name)
        return (spare, pre.spares) if spare is not None else None

    async def wait_warm(self, timeout: float) -> bool:
        """True once the warm process finished its imports (within `timeout` seconds)."""
        ready = self._warm_ready
        if ready is None or self._warm is None:
            return False
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(None, ready.wait, timeout)

    async def start(self, msg: dict) -> Kernel:
        req = StartRequest.from_message(msg)
        if self.current is not None:
            raise KernelRunning()
        if req.hold and not self._preinit_usable(req.uid, req.env):
            raise CannotHold()
        gid = req.gid
        if gid is None and req.uid is not None:
            gid = procs.credentials(req.uid, None)["group"]
        full_env = self._env(req.uid, req.env)
        warmed_up = self._warm_ready is not None and self._warm_ready.is_set()
        taken = self._take_preinit(req.uid, req.env)
        if taken is not None:
            kernel = self._hand_over_preinit(*taken, req, full_env, listening=warmed_up)
        else:
            kernel = self._start_process(req, full_env, gid)
        self.current = kernel
        self.started.set()
        self._watch_in_background(kernel)
        return kernel

    def release(self) -> None:
        """Let a held kernel's requests through, in its cwd (which must exist by now)."""
        kernel = self.current
        if kernel is None:
            raise NoKernel()
        cwd = kernel.held_cwd
        if cwd is None:
            raise NothingHeld()
        if not os.path.isdir(cwd):
            raise FileNotFoundError(f"kernel cwd {cwd!r} does not exist")
        kernel.held_cwd = None
        kernel.proc.stdin.write(json.dumps({"cwd": cwd}).encode() + b"\n")
        kernel.proc.stdin.close()

    def signal(self, signum: int) -> None:
        if self.current is None:
            raise NoKernel()
        procs.signal_group(self.current.pid, signum)

    def kill_all(self) -> None:
        for p in (self.current.proc if self.current else None, self._warm):
            if p is not None and p.poll() is None:
                try:
                    procs.signal_group(p.pid, 9)
                except OSError:
                    pass

    # --- internals ---------------------------------------------------------------------------
    @staticmethod
    def _env(uid: int | None, env: dict[str, str]) -> dict[str, str]:
        full = procs.base_env(uid, "xterm-256color")
        full.update({
            "PYTHONUNBUFFERED": "1",
            "PYDEVD_DISABLE_FILE_VALIDATION": "1",  # silences debugpy's frozen-modules warning
            "JUPYTER_PLATFORM_DIRS": "1",
        })
        full.update(env)
        return full

    def _write_connection_file(self, ports, key, scheme, uid, gid) -> tuple[str, str]:
        # <rundir>/kernels is traverse-only (0711): a non-root kernel can reach its own 0700
        # directory but nobody can list the others.
        base = os.path.join(rundir(), "kernels")
        os.makedirs(base, mode=0o711, exist_ok=True)
        os.chmod(base, 0o711)
        conn_dir = os.path.join(base, f"kernel-{os.getpid()}-{next(self._seq)}")
        os.mkdir(conn_dir, 0o700)
        try:
            path = os.path.join(conn_dir, "connection.json")
            info = {f"{name}_port": port for name, port in ports.items()}
            info.update(ip="127.0.0.1", transport="tcp", key=key, signature_scheme=scheme,
                        kernel_name="capsem")
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
            with os.fdopen(fd, "w") as f:
                json.dump(info, f)
            if uid is not None or gid is not None:
                owner = (uid if uid is not None else -1, gid if gid is not None else -1)
                os.chown(path, *owner)
                os.chown(conn_dir, *owner)
        except BaseException:
            _rmtree(conn_dir)
            raise
        return conn_dir, path

    def _launch(self, conn_file, cwd, env, uid, gid) -> tuple[subprocess.Popen, bool]:
        warm = self._take_warm(env)
        if warm is not None:
            params = {"connection_file": conn_file, "cwd": cwd, "env": env, "uid": uid, "gid": gid}
            if not os.path.isdir(cwd):
                raise FileNotFoundError(f"kernel cwd {cwd!r} does not exist")
            try:
                warm.stdin.write(json.dumps(params).encode() + b"\n")
                warm.stdin.close()
                return warm, True
            except OSError:
                warm.kill()  # it died while waiting; fall back to a cold start
                warm.wait()
        proc = subprocess.Popen(
            [kernel_python(), "-m", "ipykernel_launcher", "-f", conn_file],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=cwd,
            env=env, start_new_session=True, close_fds=True, **procs.credentials(uid, gid))
        return proc, False

    def _discard_warm(self) -> None:
        warm, self._warm = self._warm, None
        if warm is not None and warm.poll() is None:
            warm.kill()
            warm.wait()
        pre, self._preinit = self._preinit, None
        if pre is not None:
            pre.discard()

    def _preinit_usable(self, uid, env) -> bool:
        """A preinit process is alive and can become a kernel of this uid and env."""
        return (self._preinit is not None and self._warm is not None and self._warm.poll() is None
                and uid is None and not any(k.startswith(PREINIT_ENV_PREFIXES) for k in env))

    def _take_preinit(self, uid, env) -> tuple[subprocess.Popen, PreinitKernel] | None:
        """The preinit process and what we keep of it, if alive and usable for a kernel of this
        uid and env; an unusable one is discarded (the kernel then starts cold)."""
        if self._preinit is None:
            return None
        if not self._preinit_usable(uid, env):
            self._discard_warm()
            return None
        taken = (self._warm, self._preinit)
        self._warm, self._preinit = None, None
        return taken

    def _hand_over_preinit(self, proc: subprocess.Popen, pre: PreinitKernel, req: StartRequest,
                           env: dict[str, str], listening: bool) -> Kernel:
        """kernel_start on the preinit process: the real key to it; the kernel is ready once it
        acknowledged (_await_ack). A process that cannot take them is killed and discarded."""
        try:
            self._send_preinit_params(proc, pre.conn_file, req, env)
        except BaseException:
            proc.kill()
            proc.wait()
            pre.discard()
            raise
        kernel = Kernel(proc, pre.ports, pre.conn_dir, True, ready=False, spares=pre.spares)
        kernel.held_cwd = req.cwd if req.hold else None
        threading.Thread(target=_await_ack, args=(pre.ack_r, kernel), daemon=True).start()
        # A warmed-up one listens (its ports are bound, its loop runs): the reply says so at
        # once, without waiting for its acknowledgement. The host's front end then connects
        # while the kernel takes its key; the relay passes nothing to it before (Kernel.ready).
        kernel.listening = listening
        return kernel

    @staticmethod
    def _send_preinit_params(proc, conn_file: str, req: StartRequest, env: dict[str, str]) -> None:
        """The real key into the connection file (replaced whole), then key, scheme, cwd, env and
        hold to the process (see preinit_kernel.Handover)."""
        if not req.hold and not os.path.isdir(req.cwd):  # held: checked at the release
            raise FileNotFoundError(f"kernel cwd {req.cwd!r} does not exist")
        with open(conn_file) as f:
            info = json.load(f)
        info.update(key=req.key, signature_scheme=req.scheme)
        tmp = conn_file + ".new"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(info, f)
        os.replace(tmp, conn_file)
        proc.stdin.write(json.dumps({"key": req.key, "signature_scheme": req.scheme, "cwd": req.cwd, "env": env,
                                     "hold": req.hold}).encode() + b"\n")
        if req.hold:
            proc.stdin.flush()  # stays open for kernel_release
        else:
            proc.stdin.close()

    def _start_process(self, req: StartRequest, env: dict[str, str], gid: int | None) -> Kernel:
        """A new connection file with the real key, then the warm process (if usable) or a cold
        `ipykernel_launcher` reads it."""
        ports = dict(zip(CHANNELS, free_ports(len(CHANNELS))))
        conn_dir, conn_file = self._write_connection_file(ports, req.key, req.scheme, req.uid, gid)
        try:
            proc, warm = self._launch(conn_file, req.cwd, env, req.uid, gid)
        except BaseException:
            _rmtree(conn_dir)
            raise
        return Kernel(proc, ports, conn_dir, warm)

    def _watch_in_background(self, kernel: Kernel) -> None:
        task = asyncio.ensure_future(self._watch(kernel))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _take_warm(self, env) -> subprocess.Popen | None:
        """The warm process, if alive and its interpreter was started with the same PYTHON* env."""
        warm, self._warm = self._warm, None
        if warm is None or warm.poll() is not None:
            return None
        def py(e):
            return {k: v for k, v in e.items() if k.startswith("PYTHON")}
        if py(env) != py(self._warm_env or {}):
            warm.kill()
            warm.wait()
            return None
        return warm

    async def _watch(self, kernel: Kernel) -> None:
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=TAIL_BYTES, loop=loop)
        transport, _ = await loop.connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(reader), kernel.proc.stdout)

        async def collect():
            while True:
                chunk = await reader.read(TAIL_BYTES)
                if not chunk:
                    return
                kernel.tail += chunk
                del kernel.tail[:-TAIL_BYTES]

        collector = asyncio.ensure_future(collect())
        try:
            returncode = await procs.wait_exit(kernel.proc)
            try:
                await asyncio.wait_for(collector, 1.0)
            except (asyncio.TimeoutError, OSError):
                pass
        finally:
            collector.cancel()
            transport.close()
            if kernel.proc.stdin is not None and not kernel.proc.stdin.closed:  # held, never released
                kernel.proc.stdin.close()
            kernel.close_relays()
            _rmtree(kernel.conn_dir)
            if self.current is kernel:
                self.current = None
        await self._send({"t": "kernel_exit", "pid": kernel.pid, **procs.exit_fields(returncode),
                          "tail": kernel.tail.decode("utf-8", "replace")})


def _await_ack(ack_r: int, kernel: Kernel) -> None:
    """Mark a preinit kernel ready once it acknowledged the real key. If it exits instead (its
    watcher reports that), its relays are closed first: none is ever joined to it."""
    acked = False
    try:
        acked = os.read(ack_r, 16).startswith(b"ok")
    except OSError:
        pass
    finally:
        os.close(ack_r)
        if acked:
            kernel.ready.set()
        else:
            kernel.close_relays()  # not alive, then woken


def _read_marker(proc: subprocess.Popen, ready: threading.Event, then=None, limit: int = 1 << 16) -> None:
    """Read the warm process's output up to its marker (start-up banners may come first; at most
    `limit` bytes). Unbuffered, and the process writes nothing after the marker until it gets its
    parameters, so what the kernel prints later is left to the kernel's watcher. `then` runs
    before `ready` is set."""
    seen = b""
    total = 0
    try:
        while total < limit:
            chunk = os.read(proc.stdout.fileno(), 4096)
            if not chunk:
                return
            total += len(chunk)
            seen = (seen + chunk)[-(len(WARM_MARKER) + 4096):]
            if WARM_MARKER in seen:
                if then is not None:
                    then()
                ready.set()
                return
    except (OSError, ValueError):
        return


class KernelRunning(Exception):
    pass


class NoKernel(Exception):
    pass


class CannotHold(Exception):
    """kernel_start with hold needs the pre-initialised kernel, and it is gone or unusable for
    this uid/env: start again without hold once the cwd exists."""


class NothingHeld(Exception):
    """kernel_release, but the kernel holds no requests (started without hold, or released)."""
