"""The node side of a Ray-placed capsem kernel: the `CapsemNode` actor (one per kernel launch).

The front end creates it with `.options(resources={"capsem": 1})`, so Ray places it only on a
node that advertises the resource (`ray start --resources '{"capsem": N}'`). Through Ray it only
takes and gives public material (RAY-INTERFACE.md, trust model):

    prepare(kernel_id, front_cert_pem) -> {"cert_pem", "host", "port", "node", "node_id"}
    check_folder(path, marker)         -> {"ok", "reason"}   (the placement check)
    facts()                            -> the node's name, id, runtime and data dirs
    stop()                             -> tears everything down

Everything else arrives on the mutual-TLS control connection (capsem_kernel/remote/tunnel.py),
which only the front end holding the certificate pinned in prepare() can open:

    front -> node  start{kernel_id, key (hex), signature_scheme, policy, folder, cwd, env, extra}
                   interrupt signal{signum} shutdown{restart} ping{seq} barrier{id} agent{id, msg}
    node -> front  ready{node, info} info{info} died{reason} error{code, message} pong{seq} stopped
                   audit{rows} barrier_done{id, complete} agent_reply{id, reply}
                   agent_error{id, code, message}
(capsem_kernel/remote/wire.py checks every message's fields both ways.)

The VM is booted with the node's own capsem machinery (KernelVM, a claim from the node's `capsem
pool` when `use_pool` and one runs), under the node's CAPSEM_RUNTIME_DIR / data dir (the worker
inherits them from `ray start`), with the node's egress proxy service and audit database. The
node's rows of the kernel are sent to the front end (audit_rows.py).

Teardown (VM, tunnel, the policy file and a node-local folder) runs when the control connection
closes, when the front end has been silent for SILENT_LIMIT s, on stop(), and on the kernel's
death once reported. If the actor's process dies, the VM's helpers die with it (PR_SET_PDEATHSIG,
capsem_vm/process.py) and the node's next capsem start sweeps their runtime files.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import shutil
import signal
import socket
import stat
import tempfile
from pathlib import Path
from typing import Any

from capsem_vm import paths, runtime
from capsem_vm.config import DEFAULT_CPUS, DEFAULT_MEMORY_MB, EgressConfig, Share, VMConfig

from .. import loop_thread
from ..channels import PORT_KEYS
from . import audit_rows

log = logging.getLogger(__name__)

SILENT_LIMIT = 10.0     # the front end pings every 2 s; this long without a message: it is gone
AUDIT_PUSH_S = 1.0      # how often new audit rows of the kernel go to the front end
AGENT_TIMEOUT = 90.0    # one relayed agent request (files.REQUEST_TIMEOUT)
AGENT_TYPES = ("file",)  # agent requests the front end may relay (the Sandbox files API)
MAX_ENV = 64
MAX_TEXT = 4096
NODE_RESOURCE = re.compile(r"^capsem-node-([A-Za-z0-9_.-]{1,64})$")


class StartRefused(ValueError):
    """A start message this node will not act on; `code` is stable."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


def node_name(resources: dict[str, Any] | None = None) -> str:
    """CAPSEM_NODE, else the node's `capsem-node-<name>` resource, else the hostname."""
    if os.environ.get("CAPSEM_NODE"):
        return os.environ["CAPSEM_NODE"][:64]
    for key in sorted(resources or {}):
        if m := NODE_RESOURCE.match(key):
            return m.group(1)
    return socket.gethostname()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _text(msg: dict, key: str, *, optional: bool = False, limit: int = MAX_TEXT) -> str | None:
    value = msg.get(key)
    if value is None and optional:
        return None
    if not isinstance(value, str) or not value or len(value) > limit or "\x00" in value:
        raise StartRefused("bad_start", f"the start message's {key!r} is not a usable string")
    return value


def parse_start(msg: dict, kernel_id: str) -> dict[str, Any]:
    """The start message checked field by field (sans-IO): what launch() needs. Raises StartRefused."""
    if msg.get("kernel_id") != kernel_id:
        raise StartRefused("wrong_kernel", "the start message names another kernel than this actor's")
    try:  # hex on the wire (wire.py); the connection file's key is text
        key = bytes.fromhex(_text(msg, "key", limit=512)).decode("utf-8")
    except (ValueError, UnicodeDecodeError):
        raise StartRefused("bad_start", "the key is not hex of UTF-8 text") from None
    scheme = _text(msg, "signature_scheme", limit=64)
    if scheme not in ("hmac-sha256",):
        raise StartRefused("bad_start", "only the hmac-sha256 signature scheme is supported")
    policy = msg.get("policy")
    if policy is not None and (not isinstance(policy, str) or len(policy) > 60_000):
        raise StartRefused("bad_start", "the policy is not text")
    folder = _text(msg, "folder", optional=True)
    if folder is not None and not os.path.isabs(folder):
        raise StartRefused("bad_start", "the folder must be an absolute path")
    env = msg.get("env", {})
    if (not isinstance(env, dict) or len(env) > MAX_ENV
            or not all(isinstance(k, str) and isinstance(v, str) and len(k) < 256 and len(v) < MAX_TEXT
                       for k, v in env.items())):
        raise StartRefused("bad_start", "the environment is not a small dict of strings")
    extra = msg.get("extra", {})
    if not isinstance(extra, dict):
        raise StartRefused("bad_start", "extra is not a dict")

    def integer(name: str, default: int, lo: int, hi: int) -> int:
        value = extra.get(name, default)
        if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
            raise StartRefused("bad_start", f"{name} must be an integer in [{lo}, {hi}]")
        return value

    def choice(name: str, default: str, allowed: tuple[str, ...]) -> str:
        value = extra.get(name, default)
        if value not in allowed:
            raise StartRefused("bad_start", f"{name} must be one of {', '.join(allowed)}")
        return value

    image = extra.get("image")
    if image is not None and (not isinstance(image, str) or not os.path.isabs(image)):
        raise StartRefused("bad_start", "image must be an absolute path")
    return {
        "key": key, "signature_scheme": scheme, "policy": policy, "folder": folder, "env": dict(env),
        "memory_mb": integer("memory_mb", DEFAULT_MEMORY_MB, 256, 1 << 20),
        "cpus": integer("cpus", DEFAULT_CPUS, 1, 256),
        "boot_timeout": integer("boot_timeout", 180, 10, 3600),
        "share_mode": choice("share_mode", "rw", ("rw", "ro")),
        "accel": choice("accel", "auto", ("auto", "kvm", "tcg")),
        "vsock": choice("vsock", "auto", ("auto", "vhost-user", "kernel")),
        "observe": bool(extra.get("observe", False) is True),
        "use_pool": bool(extra.get("use_pool", False) is True),
        "image": image,
    }


def check_folder(path: str, marker: str | None) -> dict[str, Any]:
    """Whether this node sees the front end's folder `path`: a directory (no symbolic link) at the
    same path, holding the marker file the front end just made there (so a different directory
    at the same path does not pass). `marker` None: the front end could not write one."""
    if not isinstance(path, str) or not os.path.isabs(path):
        return {"ok": False, "reason": "the folder is not an absolute path"}
    try:
        st = os.lstat(path)
    except OSError as exc:
        return {"ok": False, "reason": f"the node cannot see {path} ({exc.strerror})"}
    if not stat.S_ISDIR(st.st_mode):
        return {"ok": False, "reason": f"{path} is not a directory on the node"}
    if marker is not None:
        if not re.fullmatch(r"\.capsem-placement-[0-9a-f]{32}", marker):
            return {"ok": False, "reason": "bad marker name"}
        if not os.path.lexists(os.path.join(path, marker)):
            return {"ok": False, "reason": f"{path} on the node is not the front end's folder (a different "
                                          "directory at the same path: mount the same filesystem there)"}
    return {"ok": True, "reason": ""}


class NodeKernel:
    """One kernel on this node, living on the capsem loop thread."""

    def __init__(self, kernel_id: str, node: str):
        self.kernel_id = kernel_id
        self.node = node
        self.tunnel = None
        self.identity = None
        self.kernel_vm = None
        self.control = None  # the one accepted TLS control connection
        self.private = Path(tempfile.mkdtemp(prefix="capsem-ray-", dir=_private_base()))
        (self.private / "owner").write_text(f"{os.getpid()} {runtime._start_time(os.getpid())}\n")
        self.own_folder: Path | None = None
        self.last_row = 0
        self._send_lock = asyncio.Lock()
        self._push_lock = asyncio.Lock()
        self._tasks: set[asyncio.Task] = set()
        self._closed = asyncio.Event()
        self._teardown: asyncio.Future | None = None

    # --- set-up (Ray: public material only) ---------------------------------------------------

    async def prepare(self, front_cert_pem: bytes, host: str) -> dict[str, Any]:
        from ..remote.identity import TlsIdentity
        from ..remote.tunnel import NodeTunnel
        from capsem_vm import sweep
        sweep.sweep_once()  # what a killed actor's VM left in this node's runtime dir
        sweep_private()
        self.identity = TlsIdentity.generate(f"capsem-node-{self.kernel_id}")
        self.tunnel = await NodeTunnel.start(host, self.identity, front_cert_pem, on_control=self._serve)
        return {"cert_pem": self.identity.cert_pem, "host": host, "port": self.tunnel.port}

    # --- the control connection ----------------------------------------------------------------

    async def _send(self, msg: dict) -> None:
        if self.control is None:
            return
        async with self._send_lock:
            with contextlib.suppress(Exception):  # a gone front end is noticed by the reader
                await self.control.send(msg)

    def _spawn(self, coro) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve(self, conn) -> None:
        if self.control is not None:  # one control connection per kernel, the first
            return  # (the tunnel closes it)
        self.control = conn
        try:
            while True:
                msg = await asyncio.wait_for(conn.receive(), SILENT_LIMIT)
                if isinstance(msg, dict):
                    await self._dispatch(msg)
        except asyncio.TimeoutError:
            log.warning("capsem node: the front end of kernel %s is silent; tearing down", self.kernel_id)
        except Exception as exc:  # noqa: BLE001 - ConnectionClosed or a broken stream: the same end
            log.info("capsem node: control connection of kernel %s ended (%s)", self.kernel_id, exc)
        finally:
            await self.teardown()

    async def _dispatch(self, msg: dict) -> None:
        op = msg.get("op")
        if op == "ping":
            await self._send({"op": "pong", "seq": msg["seq"]})
        elif op == "start":
            if self.kernel_vm is None:
                self._spawn(self._start(msg))
        elif op in ("signal", "interrupt"):
            signum = msg.get("signum", signal.SIGINT)
            if self.kernel_vm is not None and isinstance(signum, int) and signum in (
                    signal.SIGINT, signal.SIGTERM, signal.SIGKILL, signal.SIGQUIT):
                if signum == signal.SIGKILL:
                    self._spawn(self.kernel_vm.stop(grace=0.5))
                else:
                    self._spawn(self.kernel_vm.send_signal(signum))
        elif op == "shutdown":
            self._spawn(self._shutdown())
        elif op == "barrier":
            self._spawn(self._barrier(msg.get("id")))
        elif op == "agent":
            self._spawn(self._agent(msg))

    async def _start(self, msg: dict) -> None:
        from ..kernel_vm import KernelVM
        from ..provisioner import claim_pooled
        try:
            start = parse_start(msg, self.kernel_id)
            config, cwd = self._vm_config(start)
        except StartRefused as exc:
            await self._send({"op": "error", "code": exc.code, "message": str(exc)})
            return
        ports = {name: _free_port() for name in PORT_KEYS}
        connection_info = {"ip": "127.0.0.1", "transport": "tcp", "key": start["key"],
                           "signature_scheme": start["signature_scheme"],
                           **{PORT_KEYS[name]: port for name, port in ports.items()}}
        try:
            claimed = None
            if start["use_pool"]:
                claimed, _ = await claim_pooled(config, start["vsock"], log)
            if claimed is not None:
                self.kernel_vm = KernelVM(config, vm=claimed)
                try:
                    await self._launch(connection_info, cwd, start["env"], ports)
                    return
                except Exception as exc:  # noqa: BLE001 - the claimed VM is gone: boot a cold one
                    log.warning("capsem node: the claimed warm VM failed (%s); cold start", exc)
            self.kernel_vm = KernelVM(config, vsock=start["vsock"],
                                      progress=lambda m: log.info("capsem node: %s", m))
            await self._launch(connection_info, cwd, start["env"], ports)
        except Exception as exc:  # noqa: BLE001 - reported to the front end, which shows the kernel dead
            await self._send({"op": "error", "code": "start_failed",
                              "message": f"the kernel VM did not start on node {self.node}: {exc}"[:2000]})
            await self.teardown()

    async def _launch(self, connection_info: dict, cwd: str, env: dict, ports: dict[str, int]) -> None:
        kernel_vm = self.kernel_vm
        await kernel_vm.start(connection_info, cwd, env)
        self.tunnel.set_targets({name: ("127.0.0.1", port) for name, port in ports.items()})
        await self._send({"op": "ready", "node": self.node, "info": self.info()})
        self._spawn(self._report_death(kernel_vm))
        self._spawn(self._push_audit_forever())

    def _vm_config(self, start: dict) -> tuple[VMConfig, str]:
        policy_path = None
        if start["policy"] is not None:  # the text came over TLS; kept private on this node
            policy_path = self.private / "policy.toml"
            fd = os.open(policy_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(start["policy"])
        if start["folder"] is None:  # a node-local folder (the Sandbox uses the files API)
            self.own_folder = Path(tempfile.mkdtemp(prefix="capsem-sandbox-"))
            (self.private / "folder").write_text(str(self.own_folder))  # for sweep_private
            folder = str(self.own_folder)
        else:
            verdict = check_folder(start["folder"], None)
            if not verdict["ok"]:
                raise StartRefused("folder_unseen", verdict["reason"])
            folder = str(Path(start["folder"]).resolve())
        share = Share(Path(folder), "notebook", readonly=start["share_mode"] == "ro")
        egress = EgressConfig(policy=str(policy_path) if policy_path else None, kernel_id=self.kernel_id,
                              observe=start["observe"])
        config = VMConfig(memory_mb=start["memory_mb"], cpus=start["cpus"], accel=start["accel"],
                          image=start["image"], shares=(share,), boot_timeout=start["boot_timeout"],
                          egress=egress, kernel_args=("capsem.prewarm=preinit",))
        return config, folder

    async def _report_death(self, kernel_vm) -> None:
        await kernel_vm.exited.wait()
        await self._push_audit()
        reason = kernel_vm.death_reason or kernel_vm.vm.shutdown_reason or f"exit code {kernel_vm.exit_code}"
        await self._send({"op": "info", "info": self.info()})
        await self._send({"op": "died", "reason": str(reason)[:1000]})

    async def _shutdown(self) -> None:
        if self.kernel_vm is not None:
            await self.kernel_vm.stop(grace=10.0)
        await self._send({"op": "stopped"})

    # --- audit rows ------------------------------------------------------------------------------

    async def _push_audit(self) -> None:
        from capsem_vm.proxy.audit import default_db_path, read_events
        async with self._push_lock:
            rows = await asyncio.to_thread(read_events, default_db_path(), kernel=self.kernel_id,
                                           after_id=self.last_row)
            for batch in audit_rows.batches(rows):
                await self._send({"op": "audit", "rows": batch})
            if rows:
                self.last_row = max(int(r["id"]) for r in rows)

    async def _push_audit_forever(self) -> None:
        """New rows, and the kernel's facts when they changed (booting -> ready), every AUDIT_PUSH_S."""
        sent_state = None
        while not self._closed.is_set():
            await asyncio.sleep(AUDIT_PUSH_S)
            with contextlib.suppress(Exception):
                await self._push_audit()
                info = self.info()
                if info.get("state") != sent_state:
                    sent_state = info.get("state")
                    await self._send({"op": "info", "info": info})

    async def _barrier(self, ident: Any) -> None:
        from capsem_vm.egress_runtime import process_runtime
        try:
            complete = await process_runtime().audit_barrier()
        except Exception:  # noqa: BLE001 - reported as an incomplete barrier
            complete = False
        await self._push_audit()
        await self._send({"op": "barrier_done", "id": ident if isinstance(ident, int) else 0,
                          "complete": bool(complete)})

    # --- the Sandbox's files API ------------------------------------------------------------------

    async def _agent(self, msg: dict) -> None:
        from capsem_vm.control import RemoteError
        ident, request = msg["id"], msg["msg"]
        if not isinstance(request, dict) or request.get("t") not in AGENT_TYPES:
            await self._send({"op": "agent_error", "id": ident, "code": "refused",
                              "message": "only file requests are relayed to the guest agent"})
            return
        control = self.kernel_vm.vm.control if self.kernel_vm is not None else None
        if control is None:
            await self._send({"op": "agent_error", "id": ident, "code": "no_vm", "message": "no VM runs"})
            return
        try:
            reply = await control.request(request, timeout=AGENT_TIMEOUT)
        except RemoteError as exc:
            await self._send({"op": "agent_error", "id": ident, "code": exc.code,
                              "message": str(exc).split(": ", 1)[-1][:2000]})
            return
        except Exception as exc:  # noqa: BLE001 - the VM's connection is gone
            await self._send({"op": "agent_error", "id": ident, "code": "vm_gone", "message": str(exc)[:2000]})
            return
        await self._send({"op": "agent_reply", "id": ident, "reply": reply})

    # --- facts and teardown -----------------------------------------------------------------------

    def info(self) -> dict[str, Any]:
        info = self.kernel_vm.info() if self.kernel_vm is not None else {}
        return {**info, "node": self.node}

    async def teardown(self) -> None:
        """Idempotent; every caller returns once the one teardown has finished."""
        if self._teardown is None:
            self._teardown = asyncio.ensure_future(self._teardown_once())
        await asyncio.shield(self._teardown)

    async def _teardown_once(self) -> None:
        self._closed.set()
        for task in list(self._tasks):
            if task is not asyncio.current_task() and task is not self._teardown:
                task.cancel()
        try:
            if self.kernel_vm is not None:
                await self.kernel_vm.stop(grace=0.5)
        finally:
            if self.tunnel is not None:
                with contextlib.suppress(Exception):
                    await self.tunnel.close()
            shutil.rmtree(self.private, ignore_errors=True)
            if self.own_folder is not None:
                shutil.rmtree(self.own_folder, ignore_errors=True)


def _private_base() -> Path:
    """Where a kernel's policy file is kept on the node: the node's capsem runtime dir (private)."""
    return paths.ensure_private_dir(paths.runtime_dir() / "ray")


def sweep_private() -> int:
    """Remove the private dirs (policy file, node-local folder) of kernels whose actor process is
    gone (killed: no teardown ran). The owner is believed as capsem_vm/runtime.py believes its own
    (pid and start time). Returns how many were removed."""
    removed = 0
    for d in _private_base().glob("capsem-ray-*"):
        try:
            pid, start = (d / "owner").read_text().split()
            alive = runtime._alive(int(pid), start)
        except (OSError, ValueError):  # no owner yet: another actor may be creating it right now
            alive = runtime._age(d) < 60
        if alive:
            continue
        with contextlib.suppress(OSError):
            folder = Path((d / "folder").read_text().strip())
            if folder.name.startswith("capsem-sandbox-"):
                shutil.rmtree(folder, ignore_errors=True)
        shutil.rmtree(d, ignore_errors=True)
        removed += 1
    return removed


class CapsemNodeActor:
    """The Ray actor (see the module docstring). Methods run on the actor's loop; the kernel and
    its VM on the capsem loop thread of the actor's process."""

    def __init__(self):
        self.kernel: NodeKernel | None = None

    def _resources(self) -> dict[str, Any]:
        import ray
        node_id = ray.get_runtime_context().get_node_id()
        for n in ray.nodes():
            if n.get("NodeID") == node_id:
                return dict(n.get("Resources") or {})
        return {}

    async def facts(self) -> dict[str, Any]:
        import ray
        resources = self._resources()
        return {"node": node_name(resources), "node_id": ray.get_runtime_context().get_node_id(),
                "hostname": socket.gethostname(), "pid": os.getpid(),
                "runtime_dir": str(paths.runtime_dir()), "data_dir": str(paths.data_dir()),
                "capsem": resources.get("capsem", 0)}

    async def check_folder(self, path: str, marker: str | None) -> dict[str, Any]:
        return check_folder(path, marker)

    async def prepare(self, kernel_id: str, front_cert_pem: bytes) -> dict[str, Any]:
        import ray
        if self.kernel is not None:
            raise RuntimeError("this actor already serves a kernel")
        if not isinstance(kernel_id, str) or not re.fullmatch(r"[A-Za-z0-9_.-]{1,128}", kernel_id):
            raise ValueError("bad kernel id")
        facts = await self.facts()
        host = ray.util.get_node_ip_address()
        self.kernel = NodeKernel(kernel_id, facts["node"])
        out = await loop_thread.run(self.kernel.prepare(front_cert_pem, host))
        return {**out, "node": facts["node"], "node_id": facts["node_id"]}

    async def stop(self) -> None:
        if self.kernel is not None:
            await loop_thread.run(self.kernel.teardown())


def actor_class():
    """CapsemNodeActor as a Ray actor class (Ray imported only when a kernel is placed)."""
    import ray
    return ray.remote(num_cpus=0, max_restarts=0, max_task_retries=0)(CapsemNodeActor)
