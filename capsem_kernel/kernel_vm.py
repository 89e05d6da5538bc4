"""A Jupyter kernel in its own VM: boot, start ipykernel in the guest, carry its channels.

Lives on the capsem loop thread (loop_thread.py). The provisioner is a thin adapter around it.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time

from capsem_vm.config import VMConfig
from capsem_vm.errors import VMError
from capsem_vm.vm import VM

from .channels import PORT_KEYS, ChannelForwarder

log = logging.getLogger(__name__)

VM_DIED = -signal.SIGKILL  # poll() code when the VM itself died (QEMU killed, guest crashed)


class KernelVM:
    def __init__(self, config: VMConfig, *, vsock: str = "auto", progress=None):
        self.vm = VM(config, vsock=vsock, progress=progress)
        self.forwarder: ChannelForwarder | None = None
        self.kernel_pid: int | None = None
        self.exit_code: int | None = None
        self.exited = asyncio.Event()
        self._qemu_watch: asyncio.Task | None = None
        self.started_at: float | None = None  # wall clock: boot began / ipykernel answered
        self.ready_at: float | None = None

    @property
    def state(self) -> str:
        """booting (VM or ipykernel starting), ready, or dead."""
        if self.exit_code is not None:
            return "dead"
        return "ready" if self.ready_at is not None else "booting"

    async def start(self, connection_info: dict, cwd: str, env: dict[str, str]) -> None:
        self.vm.on_event = self._on_event
        self.started_at = time.time()
        await self.vm.start()
        try:
            ports = {name: int(connection_info[key]) for name, key in PORT_KEYS.items()}
            self.forwarder = ChannelForwarder(self.vm.transport, connection_info["ip"], ports)
            await self.forwarder.start()
            key = connection_info["key"]
            reply = await self.vm.control.request({
                "t": "kernel_start",
                "key": key.decode() if isinstance(key, bytes) else key,
                "signature_scheme": connection_info["signature_scheme"],
                "cwd": cwd,
                "env": env,
            }, timeout=120)
            self.kernel_pid = reply.get("pid")
            self.ready_at = time.time()
            self._qemu_watch = asyncio.ensure_future(self._watch_qemu())
        except BaseException:
            await self.stop()
            raise

    def _on_event(self, msg: dict) -> None:
        t = msg.get("t")
        if t == "kernel_exit":
            code = msg.get("code")
            self._set_exit(code if isinstance(code, int) and not isinstance(code, bool) else 1)
        elif t == "closed":  # control connection lost: the VM is gone or broken
            self._set_exit(VM_DIED)

    async def _watch_qemu(self) -> None:
        await self.vm.qemu.wait()
        self._set_exit(VM_DIED)

    def _set_exit(self, code: int) -> None:
        if self.exit_code is None:
            self.exit_code = code
            self.exited.set()

    def poll(self) -> int | None:
        if self.exit_code is None and not self.vm.alive():
            self._set_exit(VM_DIED)
        return self.exit_code

    async def send_signal(self, signum: int) -> None:
        if self.exit_code is not None or not self.vm.control:
            return
        try:
            await self.vm.control.request({"t": "signal", "target": "kernel", "signum": int(signum)}, timeout=10)
        except VMError as exc:
            log.warning("could not signal the guest kernel: %s", exc)

    async def stop(self, grace: float = 10.0) -> None:
        if self._qemu_watch:
            self._qemu_watch.cancel()
        if self.forwarder:
            await self.forwarder.close()
        await self.vm.stop(grace=grace)
        self._set_exit(self.exit_code if self.exit_code is not None else VM_DIED)

    def info(self) -> dict:
        vm = self.vm
        return {
            "runtime_dir": str(vm.paths.root) if vm.paths else None,
            "accel": vm.accel.accel if vm.accel else None,
            "memory_mb": vm.config.memory_mb,
            "cpus": vm.config.cpus,
            "image_digest": vm.image_digest,
            "shares": [{"path": s.guest_path, "readonly": s.readonly} for s in vm.config.shares],
            "timings": dict(vm.timings),
            "boot": (getattr(vm, "hello", None) or {}).get("boot"),
            "kernel_pid": self.kernel_pid,
            "state": self.state,
            "started_at": self.started_at,
            "ready_at": self.ready_at,
            "egress": vm.egress.info() if vm.egress else None,
        }
