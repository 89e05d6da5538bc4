"""A Jupyter kernel in its own VM: boot, start ipykernel in the guest, carry its channels.

Lives on the capsem loop thread (loop_thread.py). The provisioner is a thin adapter around it.

Front ends' channel connections are held on the host until the guest kernel listens (a probe
stream gets its ZMTP greeting; see channels.py for why): forwarding them at once flooded a slow
guest with relay streams, and start-up took minutes or never completed under load.

A claimed pooled VM attaches the notebook folder after vm.start() returned (vm.attaching): the
key goes over at once with kernel_start {hold}, the kernel answers kernel_info and holds every
other request until kernel_release, sent once the folder is mounted. The attach starts once that
first reply (kernel_info: every Jupyter client asks for it first) has passed the forwarder, which
sets vm.attach_gate: under emulation the attach competed with it for the guest's CPUs (a client
that asks for nothing waits at most ClaimedVM's ATTACH_DELAY). If the attach fails, the kernel
never runs code outside its folder: the VM is stopped and the kernel reported dead.

What KernelVM needs from a VM, cold or claimed, is capsem_vm.vm_protocol.GuestVM.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections.abc import Callable
from typing import Any

from capsem_agent import protocol

from capsem_vm.config import VMConfig
from capsem_vm.control import ControlConnection, RemoteError
from capsem_vm.errors import VMError
from capsem_vm.polling import PollTimeout, poll_until_async
from capsem_vm.vm import VM
from capsem_vm.vm_protocol import GuestVM
from capsem_vm.vsock import VsockTransport

from .channels import PORT_KEYS, ChannelForwarder

log = logging.getLogger(__name__)

VM_DIED = -signal.SIGKILL  # poll() code when the VM itself died (QEMU killed, guest crashed)
LISTEN_TIMEOUT = 900.0  # ipykernel's start under a loaded TCG host can take minutes


class KernelVM:
    def __init__(self, config: VMConfig, *, vsock: str = "auto", progress: Callable[[str], None] | None = None,
                 vm: GuestVM | None = None):
        """vm: a claimed pooled VM (capsem_vm.pool.claimed.ClaimedVM) instead of a cold one."""
        self.vm: GuestVM = vm if vm is not None else VM(config, vsock=vsock, progress=progress)
        self.vm.on_event = self._on_event
        self.pooled = vm is not None
        self.forwarder: ChannelForwarder | None = None
        self.kernel_pid: int | None = None
        self.exit_code: int | None = None
        self.exited = asyncio.Event()
        self._qemu_watch: asyncio.Task[None] | None = None
        self._gate: asyncio.Task[None] | None = None
        self._release: asyncio.Task[None] | None = None  # kernel_start {hold}: sends kernel_release
        self._stopping: asyncio.Future[None] | None = None
        self.attach_error: str | None = None  # why a pooled VM's folder could not be attached
        self.death_reason: str | None = None  # e.g. "virtiofsd for /path exited (signal 9)"
        self._listening = asyncio.Event()  # the guest kernel accepts connections
        self._booted = False  # vm.start() done: from now on a VM that is not alive() is dead
        self.started_at: float | None = None  # wall clock: boot began / ipykernel answered
        self.ready_at: float | None = None
        self.marks: dict[str, float] = {}  # time.monotonic() of the start's steps (bench/start.py --breakdown)

    @property
    def state(self) -> str:
        """booting (VM or ipykernel starting), ready, or dead."""
        if self.exit_code is not None:
            return "dead"
        return "ready" if self.ready_at is not None else "booting"

    @property
    def control(self) -> ControlConnection:
        """The guest agent's connection (there once vm.start() returned)."""
        if self.vm.control is None:
            raise VMError("the kernel's VM has no agent connection")
        return self.vm.control

    @property
    def transport(self) -> VsockTransport:
        if self.vm.transport is None:
            raise VMError("the kernel's VM has no vsock transport")
        return self.vm.transport

    async def start(self, connection_info: dict[str, Any], cwd: str, env: dict[str, str],
                    listeners: dict[str, Any] | None = None) -> None:
        """listeners: channel name -> a socket already listening on its port (port_hold.py)."""
        self.started_at = time.time()
        await self.vm.start()
        self._booted = True
        try:
            ports = {name: int(connection_info[key]) for name, key in PORT_KEYS.items()}
            self.forwarder = ChannelForwarder(self.transport, connection_info["ip"], ports,
                                              early_streams=self.vm.take_channel_stream, listeners=listeners)
            self.forwarder.ready = self._listening
            attach_gate = self.vm.attach_gate
            if attach_gate is not None:  # a pooled VM attaches its folder after the first reply
                self.forwarder.shell_replied = attach_gate
                # ... or at once when the first request is one the kernel holds (a cell sent
                # without kernel_info first): it would wait for the folder anyway
                self.forwarder.shell_requested = getattr(self.vm, "attach_request", None) or attach_gate
            await self.forwarder.start()
            key = connection_info["key"]
            request = {
                "t": "kernel_start",
                "key": key.decode() if isinstance(key, bytes) else key,
                "signature_scheme": connection_info["signature_scheme"],
                "cwd": cwd,
                "env": env,
            }
            attaching = self.vm.attaching
            reply = None
            if attaching is not None:
                try:
                    reply = await self.control.request({**request, "hold": True}, timeout=120)
                    self._release = asyncio.ensure_future(self._release_when_attached(attaching))
                except RemoteError as exc:
                    if exc.code != "cannot_hold":  # no pre-started kernel for this env: start it in the folder
                        raise
                    self.forwarder.early_streams = None  # primed for the pre-started kernel, which goes
                    if attach_gate is not None:
                        attach_gate.set()
                    await attaching
            if reply is None:
                reply = await self.control.request(request, timeout=120)
            self.marks["kernel_started"] = time.monotonic()
            self.kernel_pid = reply.get("pid")
            self._qemu_watch = asyncio.ensure_future(self._watch_qemu())
            if reply.get("listening") is True:  # a pre-started kernel (taking the key): no probe
                self._listening.set()
                self.ready_at = time.time()
            else:
                self._gate = asyncio.ensure_future(self._open_channels_when_listening())
        except BaseException:
            await self.stop()
            raise

    async def _release_when_attached(self, attaching: asyncio.Task[None]) -> None:
        try:
            await attaching
            await self.control.request({"t": "kernel_release"}, timeout=30)
            self.marks["released"] = time.monotonic()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - whatever it was, this kernel must not run
            self.attach_error = str(exc)
            log.error("the notebook folder could not be attached to the kernel's VM, stopping the kernel: %s",
                      exc)
            await self.stop(grace=1)

    async def _open_channels_when_listening(self) -> None:
        """Let the forwarder carry channels once the guest kernel accepts connections on its
        last-bound port (hb): the relay joins a probe stream to it, and the kernel's ZMQ greets."""
        try:
            await poll_until_async(self._listening_or_exited, what="the guest kernel to listen",
                                   timeout=LISTEN_TIMEOUT, interval=0.5)
        except PollTimeout:
            log.error("the guest kernel did not listen within %.0f s", LISTEN_TIMEOUT)
            await self.send_signal(signal.SIGKILL)
            return
        if self.exit_code is None:
            self._listening.set()
            self.ready_at = time.time()

    async def _listening_or_exited(self) -> bool:
        if self.exit_code is not None:
            return True
        writer = None
        try:
            reader, writer = await self.transport.connect(protocol.PORT_CHANNELS, timeout=30)
            writer.write(protocol.encode({"t": "channel", "name": "hb"}))
            await writer.drain()
            # The relay waits for the kernel's port (up to its own limit, then closes: retry).
            return bool(await reader.read(1))
        except (OSError, asyncio.TimeoutError) as exc:
            log.debug("kernel listening probe: %s", exc)
            return False
        finally:
            if writer is not None:
                writer.close()

    def _on_event(self, msg: dict[str, Any]) -> None:
        t = msg.get("t")
        if t == "kernel_exit":
            code = msg.get("code")
            self._set_exit(code if isinstance(code, int) and not isinstance(code, bool) else 1)
        elif t == "closed":  # control connection lost: the VM is gone or broken
            self._set_exit(VM_DIED)
        elif t == "vm_died":  # a helper the VM cannot live without exited; the VM tears itself down
            reason = msg.get("reason")
            self.death_reason = reason if isinstance(reason, str) else "a helper of the VM exited"
            log.error("the kernel's VM died: %s", self.death_reason)
            self._set_exit(VM_DIED)
        elif t == "vm_shutdown":  # QEMU says the guest powered off, reset or panicked
            if self.exit_code is None and self._stopping is None:
                log.warning("the kernel's VM ended (%s)", msg.get("reason"))
            self._set_exit(VM_DIED)

    async def _watch_qemu(self) -> None:
        if self.vm.qemu is not None:
            await self.vm.qemu.wait()
        self._set_exit(VM_DIED)

    def _set_exit(self, code: int) -> None:
        if self.exit_code is None:
            self.exit_code = code
            self.exited.set()

    def poll(self) -> int | None:
        """None while the VM boots and while the kernel runs; the exit code once it died. (While
        booting, vm.alive() is False: QEMU or the control connection do not exist yet. A failed
        boot ends in stop(), which sets the exit code.)"""
        if self.exit_code is None and self._booted and not self.vm.alive():
            self._set_exit(VM_DIED)
        return self.exit_code

    async def send_signal(self, signum: int) -> None:
        if self.exit_code is not None or not self.vm.control:
            return
        try:
            await self.control.request({"t": "signal", "target": "kernel", "signum": int(signum)}, timeout=10)
        except VMError as exc:
            log.warning("could not signal the guest kernel: %s", exc)

    async def stop(self, grace: float = 10.0) -> None:
        """Idempotent; one teardown runs to its end even if a caller is cancelled (a failed attach
        stops the kernel from its release task, which the provisioner's own stop then cancels)."""
        if self._stopping is None:
            self._stopping = asyncio.ensure_future(self._stop(grace))
        await asyncio.shield(self._stopping)

    async def _stop(self, grace: float) -> None:
        for task in (self._qemu_watch, self._gate, self._release):
            if task:
                task.cancel()
        if self.forwarder:
            await self.forwarder.close()
        await self.vm.stop(grace=grace)
        self._set_exit(self.exit_code if self.exit_code is not None else VM_DIED)

    def info(self) -> dict[str, Any]:
        vm = self.vm
        return {
            "runtime_dir": str(vm.paths.root) if vm.paths else None,
            "accel": vm.accel.accel if vm.accel else None,
            "memory_mb": vm.config.memory_mb,
            "cpus": vm.config.cpus,
            "image_digest": vm.image_digest,
            "shares": [{"path": s.guest_path, "readonly": s.readonly} for s in vm.config.shares],
            "timings": dict(vm.timings),
            "boot": (vm.hello or {}).get("boot"),
            "kernel_pid": self.kernel_pid,
            "state": self.state,
            "started_at": self.started_at,
            "ready_at": self.ready_at,
            "egress": vm.egress.info() if vm.egress else None,
            "held": self._release is not None,  # the key went over while the folder attached
            "attach_error": self.attach_error,
            "shutdown_reason": vm.shutdown_reason,  # QEMU's reason, once the guest ended
            "death_reason": self.death_reason,  # a helper the VM could not live without exited
            "pooled": self.pooled,
            "marks": {**getattr(vm, "marks", {}), **self.marks},
        }
