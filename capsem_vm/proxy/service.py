"""Parent side of the proxy service: start/stop the mitmproxy process, register kernels.

Why a separate process: mitmproxy wants its own event loop and sets process globals, and it pins
tornado/cryptography versions that clash with a current Jupyter server; so it runs from its own
venv (find_proxy_python) as `python -m capsem_vm.proxy.server`, importing only capsem's own
packages from this env (child_code.py). One service per owning process
(one per Jupyter server, shared by all its kernels): it inherits that server's environment (where
credential env vars live), dies with it (stdin EOF + PR_SET_PDEATHSIG), and needs no daemon
management or cross-user coordination.

Control channel: the child's stdin/stdout carry capsem frames (capsem_agent.protocol). Only the
parent holds those pipes, so only it can register kernels. Each kernel gets a random SOCKS5
username/password; the listener (127.0.0.1, random port) rejects every other client, so no other
local user or process can use it as an open proxy.

    service = ProxyService(...); await service.start()   # VMs share one: egress_runtime.py
    endpoint = await service.register(kernel_id, policy)   # -> ProxyEndpoint for the EgressBridge
    await service.reload(kernel_id, new_policy)    # a running kernel's new policy, same credentials
    await service.flush_audit()                    # every worker's audit rows so far are written
    await service.unregister(kernel_id)
    await service.close()

A worker that dies is not replaced here: its owner (the EgressRuntime's supervisor,
proxy/supervisor.py) is told through `on_worker_exit` at once (the worker's control pipe closes)
and calls `replace_worker`, which starts a new process and registers every kernel with it again,
with the policy it has now (the last `reload`) and the SOCKS credentials it had. Bridges ask their endpoint for the serving workers'
ports on every stream (`ProxyEndpoint.serving_ports`), so they follow the replacement.
"""

from __future__ import annotations

import asyncio
import importlib.util
import itertools
import os
import secrets
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from capsem_agent import protocol

from .. import paths
from ..errors import CapsemError, MissingHelperError
from ..policy import Policy
from ..setup.locations import system_proxy_env
from .child_code import child_code_dir

START_TIMEOUT = 60.0
# what the proxy's own env needs (pyproject's `proxy` extra; tests/test_wheel_install.py checks)
PROXY_REQUIREMENTS = ("mitmproxy==11.0.2; python_version < '3.12'", "mitmproxy==12.3.1; python_version >= '3.12'",
                      "platformdirs>=3", "uvloop>=0.19")


class ProxyServiceError(CapsemError):
    """The proxy service failed to start or died."""


@dataclass(frozen=True)
class ProxyEndpoint:
    """Where and how one kernel's bridge reaches the proxy service (SOCKS5 with user/password).
    `ports`: one listener per worker process when registered; the bridge spreads connections
    over `serving_ports()`, which follows the service when it replaces a dead worker."""
    host: str
    ports: tuple[int, ...]
    username: str
    password: str = field(repr=False)
    service: "ProxyService | None" = field(default=None, repr=False, compare=False)

    @property
    def port(self) -> int:
        return self.ports[0]

    def serving_ports(self) -> tuple[int, ...]:
        """The ports of the workers that serve this kernel now (empty: none is up)."""
        return self.service.serving_ports() if self.service is not None else self.ports

    @property
    def restarting(self) -> bool:
        """A supervisor is bringing a dead worker of this service back (proxy-restarting)."""
        return self.service is not None and self.service.supervised


def proxy_venvs() -> tuple[Path, ...]:
    """Where a proxy env is looked for: `.venv-proxy` beside this env (what `make proxy-venv`
    makes beside .venv in a checkout), then the system's (root's `capsem setup`: /opt/capsem),
    then the user's own (data dir; a normal user's `capsem setup` makes it when there is no system one)."""
    return (Path(sys.prefix).parent / ".venv-proxy", Path(system_proxy_env()), paths.data_dir() / "proxy-venv")


def proxy_env_hint() -> str:
    """What a user without a proxy env does (pip users have no Makefile)."""
    venv = shlex.quote(str(paths.data_dir() / "proxy-venv"))
    reqs = " ".join(map(shlex.quote, PROXY_REQUIREMENTS))
    return (f"the egress proxy runs mitmproxy from its own Python env: run `capsem setup` (as root it "
            f"makes {system_proxy_env()} for every user, as yourself {venv}), or create it by hand with "
            f"`python3 -m venv {venv} && {venv}/bin/pip install {reqs}`, "
            f"or set CAPSEM_PROXY_PYTHON to a Python that has them (in a source checkout: `make "
            f"proxy-venv`; it runs `capsem setup --proxy-env .venv-proxy`)")


def find_proxy_python(explicit: str | None = None) -> str:
    """The interpreter that has mitmproxy: explicit, $CAPSEM_PROXY_PYTHON, this one, or a proxy venv."""
    for cand in (explicit, os.environ.get("CAPSEM_PROXY_PYTHON")):
        if cand:
            return cand
    if importlib.util.find_spec("mitmproxy") is not None:
        return sys.executable
    for venv in proxy_venvs():
        py = venv / "bin" / "python"
        if py.exists():
            return str(py)
    raise MissingHelperError("mitmproxy is not installed: the egress proxy service cannot start "
                             f"(looked in {', '.join(map(str, proxy_venvs()))})", hint=proxy_env_hint())


class _Worker:
    """One service process and its control pipe."""

    def __init__(self, python: str, config: dict, log_path: Path,
                 on_exit: Callable[["_Worker"], None] | None = None):
        """on_exit(worker): called once, on the loop, when a worker that was ready dies without
        being closed (its stdout closed: SIGKILL, a crash)."""
        self.python, self.config, self.log_path = python, config, log_path
        self.on_exit = on_exit
        self.proc: asyncio.subprocess.Process | None = None
        self.socks: tuple[str, int] | None = None
        self.serving = False  # every registered kernel is registered with it: bridges may use it
        self._ready_seen = False
        self._closing = False
        self._ids = itertools.count(1)
        self._waiters: dict[int, asyncio.Future] = {}
        self._reader_task: asyncio.Task | None = None
        self._ready: asyncio.Future | None = None

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.returncode is None and self.socks is not None

    async def start(self) -> None:
        env = dict(os.environ)
        # why: the child imports the same capsem code as we do, whatever its venv has installed,
        # and nothing else of this env (no site-packages, no inherited PYTHONPATH/PYTHONHOME)
        env.pop("PYTHONHOME", None)
        env["PYTHONPATH"] = str(child_code_dir())
        env["PYTHONUNBUFFERED"] = "1"
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")
        try:
            self.proc = await asyncio.create_subprocess_exec(
                self.python, "-m", "capsem_vm.proxy.server",
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=log, env=env,
                limit=protocol.MAX_FRAME + 16)
        except OSError as exc:
            raise ProxyServiceError(f"cannot start the proxy service with {self.python}: {exc}",
                                    hint=proxy_env_hint()) from None
        finally:
            log.close()
        self._ready = asyncio.get_running_loop().create_future()
        self._reader_task = asyncio.ensure_future(self._read_loop())
        self.proc.stdin.write(protocol.encode({"t": "start", **self.config}))
        try:
            msg = await asyncio.wait_for(asyncio.shield(self._ready), START_TIMEOUT)
        except asyncio.TimeoutError:
            await self.close()
            raise ProxyServiceError("the proxy service did not start in time",
                                    hint=f"see its log: {self.log_path}") from None
        if msg.get("t") != "ready":
            await self.close()
            raise ProxyServiceError(f"the proxy service failed to start: {msg.get('message')}",
                                    hint=f"see its log: {self.log_path}")
        host, port = msg["socks"]
        self.socks = (host, int(port))
        self._ready_seen = True

    async def close(self) -> None:
        self._closing = True  # an exit from here on is ours, not a crash
        self.serving = False
        proc, self.proc = self.proc, None
        if proc is not None and proc.returncode is None:
            try:
                proc.stdin.write(protocol.encode({"t": "stop"}))
                proc.stdin.close()
            except (ConnectionError, RuntimeError):
                pass
            try:
                await asyncio.wait_for(proc.wait(), 10)
            except asyncio.TimeoutError:
                proc.kill()
                await proc.wait()
        if self._reader_task:
            self._reader_task.cancel()
            await asyncio.gather(self._reader_task, return_exceptions=True)
        self.socks = None

    async def request(self, msg: dict, timeout: float = 30.0) -> dict:
        if not self.alive:  # why: nobody would answer; fail now rather than after the timeout
            raise ProxyServiceError(f"the proxy service worker is gone (see {self.log_path})")
        msg_id = next(self._ids)
        fut = asyncio.get_running_loop().create_future()
        self._waiters[msg_id] = fut
        try:
            self.proc.stdin.write(protocol.encode({**msg, "id": msg_id}))
            await self.proc.stdin.drain()
            reply = await asyncio.wait_for(fut, timeout)
        finally:
            self._waiters.pop(msg_id, None)
        if reply.get("t") == "error":
            raise ProxyServiceError(f"proxy service: {reply.get('message')}")
        return reply

    async def _read_loop(self) -> None:
        dec = protocol.FrameDecoder()
        try:
            while True:
                data = await self.proc.stdout.read(65536)
                if not data:
                    break
                for body in dec.feed(data):
                    msg = protocol.decode_body(body)
                    if msg.get("t") in ("ready", "fatal") and self._ready and not self._ready.done():
                        self._ready.set_result(msg)
                    fut = self._waiters.get(msg.get("id")) if isinstance(msg.get("id"), int) else None
                    if fut and not fut.done():
                        fut.set_result(msg)
        except (protocol.FrameError, protocol.MessageError, ConnectionError, AttributeError):
            pass
        finally:
            err = {"t": "fatal", "message": f"proxy service exited (see {self.log_path})"}
            if self._ready and not self._ready.done():
                self._ready.set_result(err)
            for fut in self._waiters.values():
                if not fut.done():
                    fut.set_result({"t": "error", "message": err["message"]})
            self.socks = None
            self.serving = False
            if self._ready_seen and not self._closing and self.on_exit is not None:
                self.on_exit(self)


class ProxyService:
    """The egress proxy: `workers` mitmproxy processes (default: one per core, at most 4), each on
    its own 127.0.0.1 port; every kernel is registered with all of them."""

    def __init__(self, *, python: str | None = None, audit_db: str | os.PathLike | None = None,
                 ca_dir: str | os.PathLike | None = None, upstream_ca: str | os.PathLike | None = None,
                 resolve: dict[str, str] | None = None, header_timeout: float = 30.0,
                 idle_timeout: float = 600.0, max_header_bytes: int = 64 * 1024,
                 listen_host: str = "127.0.0.1", log_path: str | os.PathLike | None = None,
                 workers: int | None = None, audit_max_bytes: int | None = None, node: str | None = None):
        """upstream_ca: extra CA (PEM) trusted for upstream servers in addition to the host's
        trust store (tests). resolve: static name -> address map consulted before DNS (tests,
        air-gapped hosts); the address checks still apply."""
        self.python = find_proxy_python(python)
        self.config = {
            "audit_db": os.fspath(audit_db) if audit_db else None,
            "ca_dir": os.fspath(ca_dir) if ca_dir else None,
            "upstream_ca": os.fspath(upstream_ca) if upstream_ca else None,
            "resolve": dict(resolve or {}),
            "header_timeout": header_timeout,
            "idle_timeout": idle_timeout,
            "max_header_bytes": max_header_bytes,
            "listen_host": listen_host,
            "audit_max_bytes": audit_max_bytes,  # None: CAPSEM_AUDIT_MAX_MB or 256 MiB
            "node": node,                        # None: CAPSEM_NODE or ''
        }
        self.log_path = Path(log_path) if log_path else paths.runtime_dir() / f"proxy-{os.getpid()}.log"
        self.workers_n = max(1, workers if workers else min(4, os.cpu_count() or 1))
        self.workers: list[_Worker] = []
        self._kernels: dict[str, _Registration] = {}
        # on_worker_exit(index, worker): set by the owner that replaces dead workers (supervisor.py)
        self.on_worker_exit: Callable[[int, _Worker], None] | None = None
        self._closed = False

    # --- lifecycle -----------------------------------------------------------------------------

    @property
    def alive(self) -> bool:
        return bool(self.workers) and all(w.alive for w in self.workers)

    @property
    def socks(self) -> tuple[str, int] | None:
        """The first worker's listener (host, port)."""
        return self.workers[0].socks if self.workers else None

    @property
    def pids(self) -> list[int]:
        return [w.proc.pid for w in self.workers if w.proc]

    @property
    def supervised(self) -> bool:
        """Dead workers are replaced (an owner listens to on_worker_exit) and it is not closed."""
        return self.on_worker_exit is not None and not self._closed

    def serving_ports(self) -> tuple[int, ...]:
        """The listeners of the workers that are up and hold every kernel's registration."""
        return tuple(w.socks[1] for w in self.workers if w.serving and w.alive)

    def _new_worker(self) -> _Worker:
        return _Worker(self.python, self.config, self.log_path, on_exit=self._worker_exited)

    def _worker_exited(self, worker: _Worker) -> None:
        if self.on_worker_exit is not None and not self._closed and worker in self.workers:
            self.on_worker_exit(self.workers.index(worker), worker)

    async def start(self) -> None:
        from .audit import default_db_path, prepare
        from .ca import ensure_ca
        # why: create the CA and the audit database (WAL mode, schema) once here, not racing in N
        # workers: two workers switching a new database to WAL at once got "database is locked"
        await asyncio.to_thread(ensure_ca, Path(self.config["ca_dir"]) if self.config["ca_dir"] else None)
        # (an unwritable database does not stop the service: its workers refuse egress until it works)
        await asyncio.to_thread(prepare, self.config["audit_db"] or default_db_path())
        self.workers = [self._new_worker() for _ in range(self.workers_n)]
        try:
            await asyncio.gather(*(w.start() for w in self.workers))
        except BaseException:
            await self.close()
            raise
        for w in self.workers:
            w.serving = True  # no kernel registered yet

    async def replace_worker(self, index: int) -> None:
        """Start a new worker in place of worker `index` (dead or not), register every kernel with
        it (same policy, same SOCKS credentials: bridges keep theirs), then let bridges use it.
        Raises ProxyServiceError if it cannot start; the slot then stays dead."""
        if self._closed:
            raise ProxyServiceError("the proxy service is closed")
        old, new = self.workers[index], self._new_worker()
        self.workers[index] = new
        await old.close()
        await new.start()
        if self._closed or new not in self.workers:
            await new.close()
            raise ProxyServiceError("the proxy service was closed while a worker restarted")
        await self._sync(new)

    async def _sync(self, worker: _Worker) -> None:
        """Make `worker` hold exactly the current registrations. register()/unregister() calls
        racing with this also reach it (it is alive); the loop ends when nothing changed while
        it waited, and marks the worker serving without yielding in between."""
        sent: dict[str, _Registration] = {}
        while True:
            todo = {k: r for k, r in self._kernels.items() if sent.get(k) is not r}
            gone = [k for k in sent if k not in self._kernels]
            if not todo and not gone:
                break
            await asyncio.gather(*(worker.request(r.message(k)) for k, r in todo.items()),
                                 *(worker.request({"t": "unregister", "kernel": k}) for k in gone))
            sent.update(todo)
            for k in gone:
                sent.pop(k, None)
        worker.serving = True

    async def close(self) -> None:
        self._closed = True
        workers, self.workers = self.workers, []
        await asyncio.gather(*(w.close() for w in workers), return_exceptions=True)

    # --- kernels -------------------------------------------------------------------------------

    async def register(self, kernel_id: str, policy: Policy) -> ProxyEndpoint:
        """Make `policy` the policy of `kernel_id` and return the credentials its bridge uses.
        Workers being replaced get it when they start (replace_worker)."""
        if not (self.alive or (self.supervised and self.workers)):
            raise ProxyServiceError("the proxy service is not running", hint=f"see its log: {self.log_path}")
        if not 0 < len(kernel_id.encode()) < 200:
            raise ValueError("kernel id must be 1..199 bytes")
        reg = _Registration(policy, secrets.token_urlsafe(32))
        self._kernels[kernel_id] = reg
        try:
            await asyncio.gather(*(w.request(reg.message(kernel_id)) for w in self.workers if w.alive))
        except BaseException:
            if self._kernels.get(kernel_id) is reg:
                self._kernels.pop(kernel_id)
            raise
        up = [w for w in self.workers if w.alive]
        host = up[0].socks[0] if up else self.config["listen_host"]
        return ProxyEndpoint(host, self.serving_ports(), kernel_id, reg.password, service=self)

    async def reload(self, kernel_id: str, policy: Policy) -> None:
        """Make `policy` the policy of the registered `kernel_id` in every worker, keeping its SOCKS
        password (its bridge keeps its endpoint). The registration is replaced first, so a worker
        being replaced now, or later after a crash, gets this policy (replace_worker's _sync).
        ProxyServiceError if the kernel is not registered or a live worker refuses the policy."""
        old = self._kernels.get(kernel_id)
        if old is None:
            raise ProxyServiceError(f"kernel {kernel_id} is not registered with the proxy service")
        reg = _Registration(policy, old.password)
        self._kernels[kernel_id] = reg
        workers = [w for w in self.workers if w.alive]
        replies = await asyncio.gather(*(w.request(reg.message(kernel_id)) for w in workers), return_exceptions=True)
        for w, r in zip(workers, replies):
            if isinstance(r, BaseException) and w.alive:  # a dead one gets it when it is replaced
                raise r if isinstance(r, ProxyServiceError) else ProxyServiceError(f"proxy service: {r!r}")

    async def flush_audit(self, timeout: float = 10.0) -> bool:
        """The workers' half of the audit barrier: True once every row each worker recorded before
        this call is written (False if a worker is gone or its database cannot be written)."""
        if not self.alive:
            return False
        try:
            replies = await asyncio.gather(*(w.request({"t": "flush"}, timeout) for w in self.workers))
        except (ProxyServiceError, asyncio.TimeoutError, ConnectionError):
            return False
        return all(r.get("written") for r in replies)

    async def unregister(self, kernel_id: str) -> None:
        self._kernels.pop(kernel_id, None)  # first: a worker being replaced must not get it
        await asyncio.gather(*(w.request({"t": "unregister", "kernel": kernel_id})
                               for w in self.workers if w.alive), return_exceptions=True)


@dataclass(frozen=True)
class _Registration:
    """What a worker needs to serve one kernel; kept to register it again with a new worker."""
    policy: Policy
    password: str = field(repr=False)

    def message(self, kernel_id: str) -> dict:
        return {"t": "register", "kernel": kernel_id, "password": self.password,
                "policy": self.policy.text, "source": self.policy.source, "observe": self.policy.observe}
