"""The front end's side of one Ray-placed capsem kernel: what KernelVM is for a local one.

RemoteKernel has KernelVM's surface (start, poll, state, exited, send_signal, stop, info, vm), so
CapsemProvisioner's lifecycle methods, the server extension's facts and the Sandbox work on it
unchanged. It lives on the capsem loop thread (loop_thread.py), like KernelVM.

It holds the mutual-TLS control connection to the node (capsem_kernel/remote/tunnel.py) and reads
it until it closes:
- ready / info: the node's facts of the VM (public), shown as this kernel's facts with the node;
- died / error: the kernel is dead (exit code and reason as the node says);
- audit: the node's rows of this kernel, stored in the front end's audit database tagged with the
  node (audit_rows.py), so Execution.network and the server extension's log show them;
- barrier_done / agent_reply / agent_error: answers to audit_barrier() and to relayed agent
  requests (the Sandbox files API).

Death detection, bounded: a closed control connection (the actor's process died, the node's
host closed it) is noticed at once; a node that vanished without closing anything (power, network)
after at most DEAD_AFTER s of silence, as the front end pings every PING_S s and the node answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from types import SimpleNamespace
from typing import Any, Callable

from capsem_vm.config import VMConfig

from ..kernel_vm import VM_DIED
from . import audit_rows

log = logging.getLogger(__name__)

PING_S = 2.0
DEAD_AFTER = 10.0   # silence after which the node counts as lost (the bound stated in docs)
STOP_WAIT = 15.0    # a shutdown's answer from the node


class RemoteKernelError(RuntimeError):
    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


class RemoteAgent:
    """The guest agent's control connection as the Sandbox's files API uses it (request()), relayed
    by the node: only `file` requests are accepted there."""

    def __init__(self, kernel: "RemoteKernel"):
        self._kernel = kernel

    async def request(self, msg: dict, timeout: float = 30) -> dict:
        return await self._kernel.agent_request(msg, timeout)

    async def exec(self, *args, **kw):
        from capsem_vm.errors import VMError
        raise VMError("commands.run is not available on a Ray-placed sandbox (only the files API is relayed)")


class RemoteKernel:
    pooled = False

    def __init__(self, kernel_id: str, config: VMConfig, *, actor: Any = None,
                 on_closed: Callable[[bool], Any] | None = None, db_path=None):
        from capsem_vm.proxy.audit import default_db_path
        self.kernel_id = kernel_id
        self.config = config  # the front end's view (shares, sizes); the node builds its own
        self.actor = actor
        # called once the tunnel is closed, with whether the node ended without a clean stop (the
        # provisioner then ends the actor, and sweeps the node after an abnormal end)
        self.on_closed = on_closed
        self.db_path = db_path or default_db_path()
        self.node: str | None = None
        self.node_id: str | None = None
        self.tunnel = None
        self.node_info: dict[str, Any] = {}
        self.exit_code: int | None = None
        self.exited = asyncio.Event()
        self.death_reason: str | None = None
        self.started_at: float | None = None
        self.ready_at: float | None = None
        self.last_heard = time.monotonic()
        self.rows_stored = 0
        self._ready = asyncio.Event()
        self._error: RemoteKernelError | None = None
        self._ids = itertools.count(1)
        self._waiters: dict[int, asyncio.Future] = {}
        self._stopped = asyncio.Event()
        self._tasks: list[asyncio.Task] = []
        self._closing: asyncio.Future | None = None
        self.vm = SimpleNamespace(config=config, control=None, egress=None, shutdown_reason=None)

    # --- start ---------------------------------------------------------------------------------

    async def start(self, prepared: dict[str, Any], identity, start_msg: dict, timeout: float,
                    ports: dict[str, int] | None = None) -> dict[str, int]:
        """Connect to the node (pinning its certificate), send start, wait for ready, and open the
        local channel ports (`ports`, when given: a restart keeps the client's). Returns
        {channel: local port}. Raises RemoteKernelError."""
        from ..remote.tunnel import FrontTunnel
        self.started_at = time.time()
        self.node, self.node_id = prepared.get("node"), prepared.get("node_id")
        try:
            self.tunnel = await asyncio.wait_for(FrontTunnel.connect(
                prepared["host"], int(prepared["port"]), identity, prepared["cert_pem"]), 60)
            self.last_heard = time.monotonic()
            self._tasks = [asyncio.ensure_future(self._read()), asyncio.ensure_future(self._heartbeat())]
            await self.tunnel.control.send(start_msg)
            waiter = asyncio.ensure_future(self._ready.wait())
            dead = asyncio.ensure_future(self.exited.wait())
            try:
                await asyncio.wait({waiter, dead}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
            finally:
                waiter.cancel()
                dead.cancel()
            if not self._ready.is_set():
                if self._error is not None:
                    raise self._error
                raise RemoteKernelError("start_failed", self.death_reason or
                                        f"the kernel on node {self.node} was not ready within {timeout:.0f} s")
            self.vm.control = RemoteAgent(self)
            return await self.tunnel.open_local_ports(ports=ports)
        except BaseException:
            await self.stop(grace=0)
            raise

    # --- the control connection ----------------------------------------------------------------

    async def _read(self) -> None:
        control = self.tunnel.control
        try:
            while True:
                msg = await control.receive()
                self.last_heard = time.monotonic()
                if isinstance(msg, dict):
                    await self._handle(msg)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - ConnectionClosed, a broken stream: the kernel is gone
            self._died(f"the control connection to node {self.node} closed ({type(exc).__name__})")
            self._spawn_close()  # end the actor; sweep the node if it ended without a clean stop

    async def _handle(self, msg: dict) -> None:
        op = msg.get("op")
        if op in ("ready", "info") and isinstance(msg.get("info"), dict):
            self.node_info = msg["info"]
        if op == "ready":
            self.ready_at = time.time()
            self._ready.set()
        elif op == "died":
            self._died(str(msg.get("reason"))[:1000])
        elif op == "error":
            self._error = RemoteKernelError(str(msg.get("code"))[:64], str(msg.get("message"))[:2000])
            self._died(str(self._error))
        elif op == "audit":
            self.rows_stored += await asyncio.to_thread(audit_rows.store, self.db_path, self.kernel_id,
                                                        self.node or "", msg.get("rows"))
        elif op in ("barrier_done", "agent_reply", "agent_error"):
            waiter = self._waiters.pop(msg["id"], None)
            if waiter is not None and not waiter.done():
                waiter.set_result(msg)
        elif op == "stopped":
            self._stopped.set()

    async def _heartbeat(self) -> None:
        seq = itertools.count(1)
        while self.exit_code is None:
            await asyncio.sleep(PING_S)
            if time.monotonic() - self.last_heard > DEAD_AFTER:
                self._died(f"node {self.node} did not answer for {DEAD_AFTER:.0f} s (lost)")
                self._spawn_close()
                return
            with contextlib.suppress(Exception):
                await self.tunnel.control.send({"op": "ping", "seq": next(seq)})

    def _died(self, reason: str, code: int = VM_DIED) -> None:
        if self.exit_code is None:
            self.death_reason = self.death_reason or reason
            self.exit_code = code
            self.exited.set()
            self.vm.control = None
            for waiter in self._waiters.values():
                if not waiter.done():
                    waiter.set_result({"op": "agent_error", "code": "vm_gone", "message": reason})
            self._waiters.clear()
            if self._ready.is_set() and self._closing is None:
                log.error("capsem: the remote kernel %s died: %s", self.kernel_id, reason)

    async def _ask(self, msg: dict, timeout: float) -> dict:
        if self.exit_code is not None or self.tunnel is None:
            return {"op": "agent_error", "code": "vm_gone", "message": "the kernel is dead"}
        ident = next(self._ids)
        waiter = asyncio.get_running_loop().create_future()
        self._waiters[ident] = waiter
        try:
            await self.tunnel.control.send({**msg, "id": ident})
            return await asyncio.wait_for(waiter, timeout)
        finally:
            self._waiters.pop(ident, None)

    async def agent_request(self, msg: dict, timeout: float) -> dict:
        from capsem_vm.control import RemoteError
        from capsem_vm.errors import VMError
        try:
            answer = await self._ask({"op": "agent", "msg": msg}, timeout)
        except (asyncio.TimeoutError, OSError) as exc:
            raise VMError(f"the node did not answer the agent request ({type(exc).__name__})") from None
        if answer.get("op") == "agent_reply" and isinstance(answer.get("reply"), dict):
            return answer["reply"]
        code, message = str(answer.get("code"))[:64], str(answer.get("message"))[:2000]
        if code in ("vm_gone", "no_vm"):
            raise VMError(message)
        raise RemoteError(code, message)

    async def audit_barrier(self, timeout: float = 30.0) -> bool:
        """Every row the node's kernel caused so far is in the front end's database."""
        try:
            answer = await self._ask({"op": "barrier"}, timeout)  # the id is added by _ask
        except (asyncio.TimeoutError, OSError):
            return False
        return answer.get("op") == "barrier_done" and answer.get("complete") is True

    # --- KernelVM's surface ---------------------------------------------------------------------

    @property
    def state(self) -> str:
        if self.exit_code is not None:
            return "dead"
        return self.node_info.get("state") or "booting"

    def poll(self) -> int | None:
        return self.exit_code

    async def send_signal(self, signum: int) -> None:
        if self.exit_code is None and self.tunnel is not None:
            with contextlib.suppress(Exception):
                await self.tunnel.control.send({"op": "signal", "signum": int(signum)})

    async def stop(self, grace: float = 10.0) -> None:
        """Shut the node's VM down (waiting up to `grace` + a margin), close the tunnel, let the
        provisioner end the actor. Idempotent."""
        if self._closing is None:
            self._closing = asyncio.ensure_future(self._stop(grace))
        await asyncio.shield(self._closing)

    async def _stop(self, grace: float) -> None:
        if self.tunnel is not None and self.exit_code is None and grace > 0:
            with contextlib.suppress(Exception):
                await self.tunnel.control.send({"op": "shutdown", "restart": False})
                await asyncio.wait_for(self._stopped.wait(), min(grace, 10.0) + 5.0)
        self._died("stopped")
        await self._close()

    def _spawn_close(self) -> None:
        if self._closing is None:
            self._closing = asyncio.ensure_future(self._close())

    async def _close(self) -> None:
        for task in self._tasks:
            if task is not asyncio.current_task():
                task.cancel()
        if self.tunnel is not None:
            with contextlib.suppress(Exception):
                await self.tunnel.close()
        if self.on_closed is not None:
            with contextlib.suppress(Exception):
                await asyncio.to_thread(self.on_closed, not self._stopped.is_set())

    def info(self) -> dict[str, Any]:
        info = dict(self.node_info)
        info.update({"node": self.node, "node_id": self.node_id, "remote": True, "state": self.state,
                     "started_at": self.started_at, "ready_at": info.get("ready_at") or self.ready_at,
                     "death_reason": self.death_reason if self.exit_code is not None else info.get("death_reason"),
                     "pooled": bool(info.get("pooled"))})
        return info
