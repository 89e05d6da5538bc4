"""Sandbox: one capsem kernel (its own VM) as one Python object, for agents (E2B-shaped API).

    from capsem_kernel import Sandbox
    with Sandbox(policy="policy.toml") as sb:
        ex = sb.run_code("import urllib.request; urllib.request.urlopen('https://example.org')")
        ex.error, ex.logs.stdout, ex.network   # network: the audit rows this cell caused

The kernel is started exactly as a Jupyter front end starts a capsem kernel: jupyter_client's
KernelManager with the capsem provisioner (an in-memory kernelspec, so nothing has to be
installed). Every guarantee of a notebook kernel therefore holds unchanged and in one place: a VM
per kernel, only the folder shared, egress only through the policy proxy, audit rows under the
kernel id, a warm VM from the pool when one of this flavour runs (`use_pool`) else a cold boot.

Network rows of one execution (`Execution.network`): the kernel's rows with an id above its
last row id just before the execute_request was sent, read once the kernel went idle; both reads
come after the audit barrier (docs/AUDIT.md), which writes every row caused before it. Rows of a
request are recorded before the guest sees its answer, so a request in the cell's last line is
there, and rows caused before the send (a command's, the previous cell's) are below the cut: two
executions never share a row. (Traffic of a background thread of the kernel while a cell runs is
counted to that cell; between cells, to none: see `network_log()`.)
"""

from __future__ import annotations

import os
import queue
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from jupyter_client import BlockingKernelClient, KernelManager
from jupyter_client.kernelspec import KernelSpec, KernelSpecManager

from capsem_vm.config import DEFAULT_CPUS, DEFAULT_MEMORY_MB

from .commands import Commands
from .execution import Execution, ExecutionBuilder
from .files import Files
from .kernelspec import DEFAULT_NAME, PROVISIONER_NAME, RAY_PROVISIONER_NAME, kernel_json

START_TIMEOUT = 900.0     # a cold kernel under TCG on a loaded host (STARTUP in the tests: 300 s)
INTERRUPT_GRACE = 30.0    # after a timeout's interrupt, how long the cell gets to stop
RESTART_TIMEOUT = START_TIMEOUT
REMOTE_FILE_CHUNK = 32 * 1024  # a Ray-placed sandbox's file chunk: one TLS control message (64 KiB)
REPLY_WAIT = 10.0         # the execute_reply after idle (it is normally there already)
NETWORK_ROWS = 5000       # newest rows kept per execution (capsem_kernel.server.network.MAX_LIMIT)


class SandboxError(RuntimeError):
    """The sandbox cannot do what was asked (closed, kernel dead, failed to start)."""


def _parent_id(msg: Any) -> Any:
    """The msg_id of a message's parent request; None if the (guest's) message has none."""
    parent = msg.get("parent_header") if isinstance(msg, dict) else None
    return parent.get("msg_id") if isinstance(parent, dict) else None


class _OneSpec(KernelSpecManager):
    """A kernelspec manager that knows one in-memory spec: the sandbox's capsem kernel."""

    def __init__(self, spec: KernelSpec, **kw):
        super().__init__(**kw)
        self._spec = spec

    def get_kernel_spec(self, kernel_name: str) -> KernelSpec:
        return self._spec


def _kernel_spec(provisioner_config: dict, provisioner_name: str = PROVISIONER_NAME) -> KernelSpec:
    spec = kernel_json("Python 3 (Capsem sandbox)", provisioner_config, provisioner_name)
    return KernelSpec(resource_dir="", **spec)


class Sandbox:
    """One capsem kernel in its own VM. A context manager; `close()` stops the VM.

    folder: the shared working folder (the kernel's cwd, same path in the guest); None: a fresh
        private temporary folder, removed on close unless keep_folder.
    policy: egress policy file (host side); None: the user's config dir policy, else deny-all.
    timeout: default seconds for run_code / commands.run (None: no limit).
    use_pool: claim a warm VM of this flavour from `capsem pool` when one runs, else cold start.
    ray_address: place the sandbox on a node of this Ray cluster (one with the `capsem` resource;
        capsem_kernel/ray/). `folder` must then be on a filesystem the node mounts at the same path;
        None: a node-local folder, reached through `files`. `node_resources` pins a node, e.g.
        {"capsem-node-a": 0.001}. info() names the node.
    """

    def __init__(self, folder: str | os.PathLike | None = None, policy: str | os.PathLike | None = None, *,
                 memory_mb: int = DEFAULT_MEMORY_MB, cpus: int = DEFAULT_CPUS, image: str | None = None,
                 timeout: float | None = None, use_pool: bool = True, keep_folder: bool = False,
                 start_timeout: float = START_TIMEOUT, share_mode: str = "rw", ray_address: str | None = None,
                 node_resources: dict[str, float] | None = None, placement_timeout: float = 120.0):
        self.timeout = timeout
        self.interrupt_grace = INTERRUPT_GRACE  # seconds a timed-out cell gets to stop before a restart
        self._lock = threading.RLock()  # one execution / restart at a time
        self._closed = False
        self.remote = ray_address is not None
        self._own_folder = folder is None and not self.remote  # a remote one is the node's (removed there)
        self._keep_folder = keep_folder
        node_folder = folder is None and self.remote
        if folder is None:
            folder = tempfile.mkdtemp(prefix="capsem-sandbox-") if not self.remote else tempfile.gettempdir()
        self.folder = Path(folder).expanduser().resolve()
        if not self.folder.is_dir():
            raise SandboxError(f"the sandbox folder {self.folder} is not a directory")
        config: dict[str, Any] = {"memory_mb": int(memory_mb), "cpus": int(cpus), "use_pool": bool(use_pool),
                                  "share_mode": share_mode}
        provisioner_name = PROVISIONER_NAME
        if self.remote:
            from .ray.provisioner import ensure_registered
            ensure_registered()
            provisioner_name = RAY_PROVISIONER_NAME
            config.update(ray_address=str(ray_address), node_folder=node_folder,
                          node_resources=dict(node_resources or {}), placement_timeout=float(placement_timeout))
        if policy is not None:
            config["policy"] = str(Path(policy).expanduser().resolve())
        if image is not None:
            config["image"] = str(image)
        self._km = KernelManager(kernel_name=DEFAULT_NAME, kernel_spec_manager=_OneSpec(_kernel_spec(config, provisioner_name)))
        self._kc: BlockingKernelClient | None = None
        self._start_timeout = start_timeout
        from capsem_vm.proxy.audit import default_db_path
        self._audit_db = default_db_path()  # where the proxy workers and the VM's bridges write
        self.commands = Commands(self)
        # through the guest agent, beneath the folder only (files.py)
        self.files = Files(self, REMOTE_FILE_CHUNK) if self.remote else Files(self)
        try:
            self._km.start_kernel(cwd=str(self.folder))
            self._kc = self._km.client()
            self._kc.start_channels()
            self._kc.wait_for_ready(timeout=start_timeout)
            if node_folder:  # the node made the folder: its path is the guest's (and the files API's root)
                shares = (self.kernel_vm.info().get("shares") or [{}]) if self.kernel_vm is not None else [{}]
                if shares[0].get("path"):
                    self.folder = Path(shares[0]["path"])
        except BaseException as exc:
            self.close()
            if isinstance(exc, (KeyboardInterrupt, SystemExit)):
                raise
            raise SandboxError(f"the capsem kernel did not start: {exc}") from exc

    # --- E2B-style construction and context management -------------------------------------------

    @classmethod
    def create(cls, **kw) -> "Sandbox":
        return cls(**kw)

    def __enter__(self) -> "Sandbox":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def kernel_id(self) -> str:
        return self._km.kernel_id

    # --- code ------------------------------------------------------------------------------------

    def run_code(self, code: str, timeout: float | None = None, on_stdout=None, on_stderr=None,
                 on_result=None, on_error=None) -> Execution:
        """Run `code` in the kernel; see execution.py for what comes back. On timeout the kernel is
        interrupted (restarted if it ignores that for INTERRUPT_GRACE s), the output so far is
        returned with a TimeoutError as `error`, and the sandbox stays usable."""
        timeout = self.timeout if timeout is None else timeout
        builder = ExecutionBuilder(on_stdout=on_stdout, on_stderr=on_stderr, on_result=on_result,
                                   on_error=on_error)
        with self._lock:
            kc = self._client()
            cursor = self._network_cursor()
            msg_id = kc.execute(code, allow_stdin=False)
            finished = self._collect(builder, msg_id, None if timeout is None else time.monotonic() + timeout)
            if finished:
                self._drain_reply(msg_id)
            else:
                self.interrupt()
                finished = self._collect(builder, msg_id, time.monotonic() + self.interrupt_grace)
                if not finished:
                    self.restart()
                builder.timed_out(timeout or 0.0, restarted=not finished)
            self._attach_network(builder.execution, cursor)
        return builder.execution

    def _client(self) -> BlockingKernelClient:
        if self._closed or self._kc is None:
            raise SandboxError("the sandbox is closed")
        return self._kc

    def _control(self):
        """The guest agent's control connection (commands, files); SandboxError if there is none."""
        if self._closed:
            raise SandboxError("the sandbox is closed")
        kernel_vm = self.kernel_vm
        control = kernel_vm.vm.control if kernel_vm is not None else None
        if control is None:
            raise SandboxError("no VM runs (the kernel is dead or restarting)")
        return control

    def _collect(self, builder: ExecutionBuilder, msg_id: str, deadline: float | None) -> bool:
        """Feed the request's iopub messages to `builder` until idle (True) or `deadline` (False).
        A kernel that died meanwhile raises SandboxError. A message the guest made unreadable
        (its kernel holds the key, so it can sign anything) is skipped, never raised."""
        kc = self._client()
        while not builder.idle:
            wait = 1.0 if deadline is None else min(1.0, deadline - time.monotonic())
            if wait <= 0:
                return False
            try:
                msg = kc.get_iopub_msg(timeout=wait)
            except queue.Empty:
                if not self._km.is_alive():
                    raise SandboxError("the kernel died while running the code (restart() for a fresh one)") from None
                continue
            except Exception:  # noqa: BLE001 - undecodable message from the guest: skip it
                continue
            if _parent_id(msg) == msg_id:
                builder.feed(msg)
        return True

    def _drain_reply(self, msg_id: str) -> None:
        """Take this request's execute_reply off the shell queue (so replies never pile up)."""
        kc = self._client()
        deadline = time.monotonic() + REPLY_WAIT
        while time.monotonic() < deadline:
            try:
                msg = kc.get_shell_msg(timeout=max(0.05, deadline - time.monotonic()))
            except queue.Empty:
                return
            except Exception:  # noqa: BLE001 - undecodable message from the guest: skip it
                continue
            if _parent_id(msg) == msg_id:
                return

    # --- network rows ----------------------------------------------------------------------------

    def _barrier(self) -> bool:
        """The audit barrier (docs/AUDIT.md) of the runtime the provisioner's VMs use; for a
        Ray-placed sandbox the node's, once its rows are in this process's database."""
        from capsem_vm.egress_runtime import process_runtime  # the provisioners' runtime

        from . import loop_thread
        if self.remote:
            kernel_vm = self.kernel_vm
            return kernel_vm is not None and bool(loop_thread.run_sync(kernel_vm.audit_barrier(), timeout=60))
        return bool(loop_thread.run_sync(process_runtime().audit_barrier(), timeout=60))

    def _rows(self, after_id: int, limit: int = NETWORK_ROWS) -> dict:
        from .server.network import query
        return query(self._audit_db, self.kernel_id, after_id=after_id, limit=limit)

    def _network_cursor(self) -> int:
        """The kernel's last row id once every row caused so far is written (a command's request
        just before, or a background thread's, is not the next execution's)."""
        self._barrier()
        return int(self._rows(0, limit=1)["last_id"])

    def _attach_network(self, execution: Execution, cursor: int) -> None:
        execution.network_complete = self._barrier()
        execution.network = self._rows(cursor)["rows"]

    def network_log(self, after_id: int = 0, limit: int = NETWORK_ROWS) -> list[dict]:
        """This sandbox's audit rows with id > after_id, the newest `limit` (<= 5000) of them, read
        after the audit barrier: executions', commands' and anything else its VM caused."""
        self._barrier()
        return self._rows(after_id, limit)["rows"]

    # --- lifecycle -------------------------------------------------------------------------------

    def interrupt(self) -> None:
        """Interrupt the running code (KeyboardInterrupt in the cell)."""
        if not self._closed:
            self._km.interrupt_kernel()

    def restart(self) -> None:
        """A fresh kernel in a fresh VM (nothing of the old one survives); same folder and policy."""
        with self._lock:
            kc = self._client()
            self._km.restart_kernel(now=True)
            kc.wait_for_ready(timeout=RESTART_TIMEOUT)

    def is_alive(self) -> bool:
        return not self._closed and self._km.has_kernel and self._km.is_alive()

    def info(self) -> dict:
        """The VM's facts (as the server extension shows them), or {} when no VM runs."""
        kernel_vm = self.kernel_vm
        return {} if kernel_vm is None else {"kernel_id": self.kernel_id, **kernel_vm.info()}

    @property
    def kernel_vm(self):
        """The provisioner's KernelVM (capsem_kernel.kernel_vm), None if no VM runs."""
        provisioner = self._km.provisioner
        return getattr(provisioner, "kernel_vm", None) if provisioner is not None else None

    def close(self) -> None:
        """Stop the kernel and its VM (idempotent); remove a temporary folder unless kept."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            try:
                if self._kc is not None:
                    self._kc.stop_channels()
                if self._km.has_kernel:
                    self._km.shutdown_kernel(now=True)
            finally:
                if self._own_folder and not self._keep_folder:
                    shutil.rmtree(self.folder, ignore_errors=True)
