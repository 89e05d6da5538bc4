"""One VM: the one place that owns a VM's processes (QEMU and its helpers) and their teardown.

    async with VM(VMConfig(shares=(...))) as vm:
        proc = await vm.control.exec(["python3", "-c", "print(1)"])
        await proc.wait()

start(): verify the image (through the fds QEMU will use), start vsock + virtiofsd helpers, listen
for the agent (and, with config.egress, load the policy and listen on the egress ports: see
egress.py), start QEMU, wait for the agent's hello, then side by side: set up the guest's egress,
mount the shares, connect to QEMU's monitor (held until stop(): events, quit; qmp.py).
stop(): ask the agent to power off, else QMP quit (vm_base.py), then SIGTERM/SIGKILL; stop the
helpers and the egress bridge; remove the runtime dir. Helpers die with the capsem process anyway
(process.py), and a dir left behind by a killed owner is swept on the next start (runtime.py).
"""

from __future__ import annotations

import asyncio
import logging
import os
import stat
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from capsem_agent import protocol

from . import confine, helpers, privsep, runtime
from .accel import AccelChoice
from .accel import choose as choose_accel
from .caplog import CappedLog
from .config import RuntimePaths, VMConfig
from .control import ControlConnection
from .errors import ImageError, VMError
from .image.store import resolve_image
from .image.trust import check_root_only
from .image.verify import VerifiedImage, open_verified
from .process import Identity, ManagedProcess, spawn
from .qemu import BootAssets, build_command
from .qmp import Monitor
from .virtiofs import start_virtiofsd
from .vm_base import VMBase
from .vm_protocol import GuestVM, OnEvent
from .vsock import VsockTransport, select_transport
from .vsock.hangup import hang_up

if TYPE_CHECKING:
    from .egress_runtime import EgressRuntime
    from .egress import Egress

log = logging.getLogger(__name__)

Progress = Callable[[str], None]


class VM(VMBase):
    def __init__(self, config: VMConfig, *, vsock: str = "auto", progress: Progress | None = None,
                 egress_runtime: EgressRuntime | None = None):
        self.config = config
        self.egress_runtime = egress_runtime  # egress_runtime.EgressRuntime; None: the process's
        self.vsock_kind = vsock
        self.progress = progress or (lambda msg: None)
        self.paths: RuntimePaths | None = None
        self.accel: AccelChoice | None = None
        self.transport: VsockTransport | None = None
        self.qemu: ManagedProcess | None = None
        self.monitor: Monitor | None = None  # QMP, from the agent's hello until stop()
        self.helpers: list[ManagedProcess] = []
        self.control: ControlConnection | None = None
        self.hello: dict[str, Any] | None = None
        # shares are mounted in start(): no attach afterwards, as a claimed VM has (pool/claimed.py)
        self.attaching: asyncio.Task[None] | None = None
        self.attach_gate: asyncio.Event | None = None
        self.image_digest: str | None = None
        self.egress: Egress | None = None  # when config.egress is set
        self.identity: Identity | None = None  # of QEMU and the vsock backend (capsem as root)
        self._lease: privsep.Lease | None = None
        self.refused_control = 0  # extra connections to the control port (guest misbehaving)
        self._refused_noted = -1e9
        self.timings: dict[str, float] = {}
        self.on_event: OnEvent | None = None
        self.shutdown_reason: str | None = None
        self._control_ready: asyncio.Future[tuple[asyncio.StreamReader, asyncio.StreamWriter]] | None = None

    # --- start -------------------------------------------------------------------------------

    async def start(self) -> "VM":
        t0 = time.monotonic()
        try:
            await self._start(t0)
            self._started = True
            # from now on QEMU exiting on its own (killed, crashed, the guest powered off behind the
            # agent's back) is a death with a reason, and the helpers go with it (a boot failure
            # keeps its own error: _start's)
            if self.qemu is not None:
                self._watch_helper(self.qemu, "QEMU", describe=self._qemu_exit_reason)
            if self.death_reason is not None:  # a helper died at the very end of the boot
                raise VMError(self.death_reason)
        except BaseException as exc:
            await self.stop()
            if self.death_reason is not None and isinstance(exc, Exception):  # what broke the boot
                raise VMError(f"the VM died while booting: {self.death_reason}\n" + self.diagnostics()) from exc
            raise
        return self

    async def _start(self, t0: float) -> None:
        loop = asyncio.get_running_loop()
        runtime.sweep_stale()
        self.accel = choose_accel(self.config.accel)
        qemu_program = helpers.qemu()
        image_dir = resolve_image(self.config.image)
        check_host_resources(self.config)
        self.paths = runtime.create_vm_dir()
        if privsep.privileged():  # never run the helpers as root: a uid of this VM's own
            self._lease = privsep.lease_uid()
            self.identity = privsep.helper_identity(self._lease, self.accel.accel)
            runtime.give_to(self.paths, self.identity.uid, self.identity.gid)
        self.transport = select_transport(self.vsock_kind, self.paths)
        self.transport.identity = self.identity
        self.progress(f"booting VM ({self.accel.accel}, {self.config.memory_mb} MB, {self.config.cpus} CPUs)")

        # in a thread: hashing the assets (~600 MB) on the loop every VM and relay of this process
        # shares stalled them all, 10 cold starts at once for ~9 s (bench/many.py)
        verified = await asyncio.to_thread(open_verified, image_dir)
        with verified as image:
            self.image_digest = image.digest
            self.timings["verify_s"] = time.monotonic() - t0
            if self.identity is not None:
                check_root_only(image_dir, {"kernel": image.kernel, "initrd": image.initrd, "rootfs": image.rootfs})
                _check_readable_by_others(image)
            await self.transport.start()
            for proc in self.transport.helper_processes():
                self.helpers.append(proc)
                self._watch_helper(proc, proc.name)
            if self.config.egress is not None:
                from .egress import Egress  # why lazy: proxy/policy code only for VMs with egress
                self.egress = Egress(self.config.egress, [str(s.host_path) for s in self.config.shares],
                                     self.egress_runtime)
                await self.egress.start(self.transport)  # before QEMU: the guest may connect at once
            for share in self.config.shares:
                self.helpers.append(await start_virtiofsd(share, self.paths, self.identity))
                self._watch_helper(self.helpers[-1], f"virtiofsd for {share.host_path}")
            self._control_ready = loop.create_future()
            await self.transport.listen(protocol.PORT_CONTROL, self._on_control_connection)
            fds = {name: f.fileno() for name, f in (("kernel", image.kernel), ("initrd", image.initrd),
                                                   ("rootfs", image.rootfs))}
            assets = BootAssets(**{name: f"/dev/fd/{fd}" for name, fd in fds.items()})
            # QEMU's output and the guest's serial console go through size-capped pipes (caplog.py)
            console = CappedLog(self.paths.console_log,
                                owner=(self.identity.uid, self.identity.gid) if self.identity else None)
            qemu_log = CappedLog(self.paths.root / "qemu.log")
            try:
                argv = build_command(str(qemu_program.path), self.config, self.accel.accel, self.paths,
                                     assets, self.transport.qemu_args(), console=f"/dev/fd/{console.fd}")
                if self.identity is None:  # a normal user's capsem: namespaces instead of a uid
                    argv = confine.wrap(argv, self.paths.root)
                if self.death_reason is not None:
                    raise VMError(self.death_reason)
                t_qemu = time.monotonic()
                self.qemu = await spawn("qemu", argv, identity=self.identity, cwd=self.paths.root,
                                        pass_fds=(*fds.values(), console.fd, *self.transport.qemu_fds()),
                                        stdout=qemu_log.fd, stderr=qemu_log.fd)
                if self.identity is None:
                    self.qemu.stop_signal = confine.STOP_SIGNAL
            finally:
                console.close_writer()
                qemu_log.close_writer()
        runtime.record_pids(self.paths, [self.qemu] + self.helpers)

        control = await self._wait_for_hello(t_qemu)
        self.timings["hello_s"] = time.monotonic() - t_qemu
        await asyncio.gather(self._setup_egress(), self._open_monitor(self.paths.qmp_owner),
                             *(control.mount(s.tag, s.guest_path, s.readonly) for s in self.config.shares))
        self.timings["ready_s"] = time.monotonic() - t0
        self.progress(f"guest ready in {self.timings['ready_s']:.1f} s")

    async def _on_control_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # Exactly one control connection per VM: anything after the first is the guest misbehaving.
        if self._control_ready is None or self._control_ready.done():
            self._note_refused_control()
            await hang_up(reader, writer)
            return
        self._control_ready.set_result((reader, writer))

    def _note_refused_control(self) -> None:
        """Audit (with egress) every extra control connection: the audit log's rate bound counts
        repeats (docs/AUDIT.md); log them at most once a second."""
        self.refused_control += 1
        if self.egress is not None:
            self.egress.audit.record(self.egress.kernel_id, "connect", host="host", port=protocol.PORT_CONTROL,
                                     decision="deny", rule="control-port", code="control-port",
                                     reason="vsock: extra connection to the host's control port refused "
                                            "(the host accepts exactly one)")
        now = time.monotonic()
        if now - self._refused_noted < 1.0:
            return
        self._refused_noted = now
        log.warning("VM %s: refused %d extra connection(s) to the control port",
                    self.paths.root.name if self.paths else "?", self.refused_control)

    async def _wait_for_hello(self, t_qemu: float) -> ControlConnection:
        assert self.qemu is not None and self._control_ready is not None  # set by _start
        qemu_exit: asyncio.Future[Any] = asyncio.ensure_future(self.qemu.wait())
        try:
            done, _ = await asyncio.wait({self._control_ready, qemu_exit},
                                         timeout=self.config.boot_timeout,
                                         return_when=asyncio.FIRST_COMPLETED)
            if self._control_ready not in done:
                if qemu_exit in done:
                    raise VMError(f"QEMU exited with code {self.qemu.returncode} during boot\n"
                                  + self.diagnostics())
                raise VMError(f"the guest agent did not connect within {self.config.boot_timeout:.0f} s\n"
                              + self.diagnostics(), "see the console log; a slow host may need a longer timeout")
            reader, writer = self._control_ready.result()
            self.control = ControlConnection(reader, writer)
            self.control.on_event = self._on_event
            hello_task: asyncio.Future[Any] = asyncio.ensure_future(self.control.read_hello(timeout=30))
            done, _ = await asyncio.wait({hello_task, qemu_exit}, return_when=asyncio.FIRST_COMPLETED)
            if hello_task not in done:
                hello_task.cancel()
                raise VMError("QEMU exited before the agent said hello\n" + self.diagnostics())
            self.hello = hello_task.result()
            return self.control
        finally:
            qemu_exit.cancel()

    # --- state -------------------------------------------------------------------------------

    def take_channel_stream(self, name: str) -> None:
        """None: a cold VM has no channel stream opened early (a pooled one does, see
        capsem_vm.pool.claimed)."""
        return None

    def diagnostics(self, limit: int = 3000) -> str:
        parts = []
        if self.paths:
            names = ["qemu.log", "console.log", "vsock.log"] + [f"virtiofsd-{s.tag}.log" for s in self.config.shares]
            for name in names:
                text = (runtime.read_trusted(self.paths.root / name, limit, tail=True) or "").strip()
                if text:
                    parts.append(f"--- {name} (last lines) ---\n{text[-limit:]}")
        return "\n".join(parts)

    # --- stop --------------------------------------------------------------------------------

    async def _stop(self, grace: float) -> None:
        """stop(): graceful first, then forced. Never raises for an already-dead VM."""
        await self._end_helper_watches()
        try:
            await self._shut_down(grace)
            await self._close_monitor()
            if self.qemu:
                await self.qemu.stop(grace=3)
            if self.control:
                await self.control.close()
            await self._close_helpers()
        finally:
            if self.paths:
                runtime.remove_vm_dir(self.paths)
            self._release_lease()

    def _release_lease(self) -> None:
        if self._lease is not None:
            self._lease.release()
            self._lease = None

    def kill_now(self) -> None:
        """Synchronous forced teardown (for atexit or a dying event loop)."""
        self._stop_began = True
        for proc in ([self.qemu] if self.qemu else []) + self.helpers:
            proc.kill_now()
        if self.paths:
            runtime.remove_vm_dir(self.paths)
        self._release_lease()

    async def __aenter__(self) -> "VM":
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


if TYPE_CHECKING:  # mypy (`make unit`) checks that a VM is what KernelVM drives
    _VM_IS_A_GUEST_VM: type[GuestVM] = VM


def check_host_resources(config: VMConfig) -> None:
    """A VM may not ask for more memory or CPUs than this host has (clear error, not a swap storm)."""
    try:
        with open("/proc/meminfo") as f:
            total_mb = next(int(line.split()[1]) // 1024 for line in f if line.startswith("MemTotal:"))
    except (OSError, StopIteration, ValueError):
        total_mb = None
    if total_mb is not None and config.memory_mb > total_mb:
        raise VMError(f"the VM asks for {config.memory_mb} MB of memory but this host has {total_mb} MB",
                      "lower --memory (or the kernel's memory_mb setting)")
    host_cpus = len(os.sched_getaffinity(0))
    if config.cpus > host_cpus:
        raise VMError(f"the VM asks for {config.cpus} CPUs but this host has {host_cpus}",
                      "lower --cpus (or the kernel's cpus setting)")


def _check_readable_by_others(image: VerifiedImage) -> None:
    """QEMU runs as an unprivileged uid and reopens the verified assets through /dev/fd/N."""
    for name, f in (("kernel", image.kernel), ("initrd", image.initrd), ("rootfs", image.rootfs)):
        if not os.fstat(f.fileno()).st_mode & stat.S_IROTH:
            raise ImageError(f"VM asset {name} is not world-readable, so the unprivileged QEMU cannot read it",
                             "chmod 0644 the image's files (images built by `capsem image build` are)")
