"""A claimed pooled VM, driven like a cold `VM` (both are a vm_protocol.GuestVM for KernelVM),
whose start() does only what is decided per kernel, at claim time:

- adopt the agent's control connection the keeper handed over (fd passing; no new hello), and
  connect to QEMU's second QMP monitor (held until stop(): hot-plug, events, quit; qmp.py);
- egress: load this kernel's policy and listen on the guest's egress ports (the guest had no way
  out until now: its egress_setup was never sent), audit rows under this kernel's id;
- egress_setup (the kernel's env depends on it), then start() returns;
- the notebook folder, in the background (`attaching`), once `attach_gate` is set (the claimer's
  forwarder sets it when the kernel's first reply passes; at most ATTACH_DELAY): start virtiofsd for it (confined as for
  a cold VM), hot-plug a vhost-user-fs-pci device on the spare root port rp1 over that QMP, have
  the agent mount it at the same absolute path with the share's mode (read-only is enforced on
  the host, by virtiofsd). Meanwhile KernelVM hands the key over with kernel_start {hold}: the
  kernel answers kernel_info and holds every other request until the folder is there
  (kernel_release), so the attach and the hand-over share the guest's time instead of adding up.

Ownership: we hold the owner end of the keeper's socket (client.Claim): while we hold it the VM
lives; stop() asks the agent to power off (else QEMU to quit: vm_base.py), closes it (the keeper
tears QEMU and its helpers down) and waits for the keeper to exit. If this process dies, the
socket closes and the keeper does the same. virtiofsd is ours (PDEATHSIG, process.py).

Death (vm_base.py): the VM cannot live without its keeper (watched on its pidfd and its socket; a
keeper whose vsock backend or QEMU exited says so first, {"t": "died", reason}) nor the virtiofsd
started here. Either exiting: death_reason, a vm_died event, the keeper told to SIGKILL QEMU
({"t": "kill"}: a guest stuck on a dead share cannot power off), then the usual teardown.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import fds, runtime
from .. import paths as capsem_paths
from ..accel import AccelChoice
from ..config import RuntimePaths, Share, VMConfig
from ..control import ControlConnection, RemoteError
from ..errors import VMError
from ..polling import poll_until_async
from ..process import Identity, ManagedProcess
from ..qmp import Monitor
from ..virtiofs import start_virtiofsd
from ..vm_base import VMBase
from ..vm_protocol import GuestVM, OnEvent
from ..vsock.vhost_user import VhostUserTransport
from . import seqpacket, wire
from .client import Claim

if TYPE_CHECKING:
    from ..egress import Egress

log = logging.getLogger(__name__)
MOUNT_WAIT = 60.0  # s: the guest sees a hot-plugged device about a second later (more under load)
HOTPLUG_BUS = "rp1"  # qemu.py's spare pcie-root-port
MOUNT_AGENT_WAIT = 20  # s per mount request; the loop below retries up to MOUNT_WAIT
ATTACH_DELAY = 2.0  # s at most between the claim and the folder attach (see _attach)
QEMU_EXIT_WAIT = 0.5  # s for QEMU's exit to show after a helper saw it hang up
CAUSE_WAIT = 2.0  # s for a keeper whose QEMU ended to say why (it does at once; then it tears down)


class KeeperWatch:
    """Stands in for VM.qemu: the VM lives while its keeper does (the keeper exits when QEMU does).
    The keeper says why the VM ended ({"t": "died"}) before it exits; `exit_reason()` has it."""

    def __init__(self, owner: socket.socket, keeper_pid: int, qemu_pid: int):
        self.owner = owner
        self.pid = qemu_pid
        self.keeper_pid = keeper_pid
        self.returncode: int | None = None
        self.reason: str | None = None  # the keeper's {"t": "died"} reason
        self._gone = asyncio.Event()
        self._told = asyncio.Event()  # the keeper said why, or is gone
        try:  # QEMU's own exit (it is the keeper's child, not ours: polled, never awaited)
            self._qemu_pidfd = os.pidfd_open(qemu_pid)
        except OSError:
            self._qemu_pidfd = -1
        try:
            self._pidfd = os.pidfd_open(keeper_pid)
        except OSError:  # already gone
            self._pidfd = -1
            self._set_gone()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._pidfd >= 0:
            loop = asyncio.get_running_loop()
            loop.add_reader(self._pidfd, self._keeper_exited)
            self._task = asyncio.ensure_future(self._watch_owner())

    async def _watch_owner(self) -> None:
        while True:
            try:
                msg, _ = await seqpacket.recv(self.owner)
            except wire.WireError:
                continue
            except OSError:
                break
            if msg is None:
                break
            self._took(msg)
        self._set_gone()

    def _took(self, msg: dict[str, Any]) -> None:
        if msg.get("t") == "died" and self.reason is None:
            self.reason = safe_reason(msg.get("reason"))
            self._told.set()

    def qemu_alive(self) -> bool:
        if self._qemu_pidfd < 0:
            return self.alive()
        return not fds.readable(self._qemu_pidfd)  # a pidfd is readable once it exited

    async def said_why(self, timeout: float) -> str:
        """The keeper's reason, once it said it (or exited), waiting at most `timeout` s."""
        try:
            await asyncio.wait_for(self._told.wait(), timeout)
        except asyncio.TimeoutError:
            pass
        return self.exit_reason()

    def _keeper_exited(self) -> None:
        """The keeper's pidfd fired: what it sent just before exiting is already queued on the
        socket; take it now, before anyone asks why."""
        for _ in range(8):
            try:
                data = self.owner.recv(wire.MAX_MESSAGE + 1, socket.MSG_DONTWAIT)
            except OSError:
                break
            if not data:
                break
            try:
                self._took(wire.decode(data))
            except wire.WireError:
                pass
        self._set_gone()

    def _set_gone(self) -> None:
        if not self._gone.is_set():
            self.returncode = -9
            self._gone.set()
            self._told.set()
        if self._pidfd >= 0:
            try:
                asyncio.get_running_loop().remove_reader(self._pidfd)
            except RuntimeError:
                pass

    def exit_reason(self, _code: int | None = None) -> str:
        return self.reason or f"the pooled VM's keeper (pid {self.keeper_pid}) exited"

    def alive(self) -> bool:
        return not self._gone.is_set()

    async def wait(self) -> int | None:
        await self._gone.wait()
        return self.returncode

    def kill(self) -> None:
        """Ask the keeper to SIGKILL QEMU now (best effort: a keeper that is gone took QEMU along)."""
        try:
            self.owner.send(wire.encode({"t": "kill"}), socket.MSG_DONTWAIT)
        except OSError:
            pass

    async def release(self, grace: float) -> None:
        """Close our end (the keeper then stops the VM) and wait for the keeper to exit."""
        if self._task:  # finished before the close: its reader on the socket's fd goes first
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self.owner.close()
        if self._pidfd >= 0 and not self._gone.is_set():
            try:
                await asyncio.wait_for(self._gone.wait(), grace)
            except asyncio.TimeoutError:
                log.warning("pooled VM's keeper %d did not exit within %.0f s", self.keeper_pid, grace)
        self._set_gone()
        for fd in (self._pidfd, self._qemu_pidfd):
            if fd >= 0:
                os.close(fd)
        self._pidfd = self._qemu_pidfd = -1


def safe_reason(raw: object) -> str:
    """A keeper's reason, as shown to the user: printable, bounded (the keeper is ours, but its
    words name a VM whose guest is hostile)."""
    if not isinstance(raw, str) or not raw:
        return "the pooled VM ended"
    return "".join(c if c.isprintable() else "?" for c in raw[:500])


def _vm_dir(info: dict[str, Any]) -> Path:
    """The keeper's VM dir, which must be one of ours (the claimer writes sockets into it)."""
    raw = info.get("vm_dir")
    if not isinstance(raw, str):
        raise VMError("the pooled VM did not say where its runtime dir is")
    p = Path(raw)
    if p.parent != capsem_paths.runtime_dir() or not p.name.startswith(runtime.PREFIX) or p.is_symlink():
        raise VMError(f"the pooled VM's runtime dir {raw!r} is not under this user's runtime dir")
    return p


class ClaimedVM(VMBase):
    def __init__(self, config: VMConfig, claim: Claim, progress: Callable[[str], None] | None = None):
        if len(config.shares) > 1:
            raise VMError("a pooled VM has one hot-plug slot: at most one shared folder")
        info = claim.info
        self.config = config
        self.claim = claim
        self.progress = progress or (lambda msg: None)
        self.paths = RuntimePaths(_vm_dir(info))
        flavour = info["flavour"]
        self.accel: AccelChoice | None = AccelChoice(flavour["accel"], "the pool's flavour")
        self.image_digest: str | None = flavour["image_digest"]
        self.hello: dict[str, Any] | None = info["hello"] if isinstance(info.get("hello"), dict) else {}
        uid, gid = info.get("uid"), info.get("gid")
        self.identity = Identity(uid, gid, ()) if isinstance(uid, int) and isinstance(gid, int) else None
        self.transport = VhostUserTransport(self.paths)
        self.transport.identity = self.identity
        self.qemu: KeeperWatch = KeeperWatch(claim.owner, int(info["keeper_pid"]), int(info["qemu_pid"]))
        self.helpers: list[ManagedProcess] = []
        self.control: ControlConnection | None = None
        self.monitor: Monitor | None = None
        self._monitor_opening: asyncio.Future[None] | None = None  # in start(), beside the egress set-up
        self.egress: Egress | None = None
        self.on_event: OnEvent | None = None
        self.shutdown_reason: str | None = None
        self.timings: dict[str, float] = {"pool_claim_s": claim.claim_s}
        self.marks: dict[str, float] = {}  # time.monotonic() of each step of the claim (bench/start.py --breakdown)
        self.attaching: asyncio.Task[None] | None = None  # the notebook folder, attached after start()
        # set by the claimer's channel forwarder when the kernel's first shell reply passes
        self.attach_gate = asyncio.Event()
        # set by the forwarder when the front end's first request the kernel holds went by (a cell
        # sent without kernel_info first): it waits for the folder, so the attach starts at once
        self.attach_request = asyncio.Event()
        self.attach_after: str | None = None  # what opened it: "first reply", "held request" or "timeout"

    async def start(self) -> "ClaimedVM":
        t0 = self.marks["claim_start"] = time.monotonic()
        try:
            sock = socket.socket(fileno=self.claim.control_fd)
            self.claim.control_fd = -1
            reader, writer = await asyncio.open_connection(sock=sock, limit=1 << 20)
            self.control = ControlConnection(reader, writer)
            self.control.on_event = self._on_event
            self.control.adopt(self.hello or {})
            self.qemu.start()
            self._watch_helper(self.qemu, "the pooled VM's keeper", describe=self.qemu.exit_reason)
            self._monitor_opening = monitor = asyncio.ensure_future(self._open_monitor(self.paths.qmp))
            if self.config.egress is not None:
                from ..egress import Egress
                self.egress = Egress(self.config.egress, [str(s.host_path) for s in self.config.shares])
                await self.egress.start(self.transport)
            if self.config.shares:
                self.attaching = asyncio.ensure_future(self._attach(t0, monitor))
            await asyncio.gather(self._setup_egress(), monitor)
            self.marks["started"] = time.monotonic()
            self.timings["ready_s"] = self.marks["started"] - t0
            self._started = True
            if self.death_reason is not None:  # it died at the very end of the claim
                raise VMError(self.death_reason)
        except BaseException as exc:
            await self.stop(grace=1)
            if self.death_reason is not None and isinstance(exc, Exception) and not isinstance(exc, VMError):
                raise VMError(f"the pooled VM died: {self.death_reason}") from exc
            raise
        return self

    async def _attach(self, t0: float, monitor: asyncio.Future[None]) -> None:
        # virtiofsd is host work only: it starts at once (the folder is this claimer's). The
        # hot-plug and mount (the guest's PCI and virtiofs probe, mount) compete for the emulated
        # guest's CPUs with the kernel's first reply; that reply comes first, unless the first
        # request is one the kernel holds until the folder is there.
        for share in self.config.shares:
            self.helpers.append(await start_virtiofsd(share, self.paths, self.identity))
            self._watch_helper(self.helpers[-1], f"virtiofsd for {share.host_path}")
        self.marks["virtiofsd"] = time.monotonic()
        self.attach_after = await self._gate()
        self.marks["attach_gate"] = time.monotonic()
        self.timings["attach_delay_s"] = self.marks["attach_gate"] - t0
        await monitor
        for share in self.config.shares:
            t = time.monotonic()
            await self._hotplug(share)
            self.marks["hotplugged"] = time.monotonic()
            self.timings["hotplug_s"] = self.marks["hotplugged"] - t
            await self._mount(share)
            self.marks["mounted"] = time.monotonic()
        self.timings["attach_s"] = time.monotonic() - t0
        self.progress(f"claimed a warm VM; folder attached in {self.timings['attach_s']:.2f} s")

    async def _gate(self) -> str:
        """Wait for the kernel's first reply or a held request (at most ATTACH_DELAY); says which."""
        waits = [asyncio.ensure_future(e.wait()) for e in (self.attach_gate, self.attach_request)]
        try:
            await asyncio.wait(waits, timeout=ATTACH_DELAY, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waits:
                w.cancel()
        if self.attach_gate.is_set():
            return "first reply"
        return "held request" if self.attach_request.is_set() else "timeout"

    async def _hotplug(self, share: Share) -> None:
        assert self.monitor is not None  # _attach awaited it
        chardev = f"fs-{share.tag}"
        try:
            # relative: QEMU's cwd is the VM dir (qemu.py)
            await self.monitor.execute("chardev-add", {"id": chardev, "backend": {"type": "socket", "data": {
                "addr": {"type": "unix", "data": {"path": self.paths.fs_socket(share.tag).name}},
                "server": False}}})
            await self.monitor.execute("device_add", {"driver": "vhost-user-fs-pci", "id": f"{chardev}-dev",
                                                      "chardev": chardev, "tag": share.tag, "bus": HOTPLUG_BUS})
        except VMError as exc:
            raise VMError(f"could not hot-plug the folder {share.guest_path} into the pooled VM: {exc}") from None

    async def _mount(self, share: Share) -> None:
        control = self.control
        assert control is not None  # start() adopted it before the attach began
        t = time.monotonic()
        refused: list[RemoteError] = []

        async def mounted() -> bool:
            try:  # the agent waits for the device itself (mounts.mount_virtiofs_when_present)
                await control.mount(share.tag, share.guest_path, share.readonly, wait=MOUNT_AGENT_WAIT)
                return True
            except RemoteError as exc:  # the device is not there yet
                refused[:] = [exc]
                return False
        await poll_until_async(
            mounted, what=f"the guest to mount {share.guest_path}", timeout=MOUNT_WAIT, interval=0.05,
            error=lambda _: VMError(f"the guest could not mount the hot-plugged folder {share.guest_path}: "
                                    f"{refused[-1]}"))
        self.timings["mount_s"] = time.monotonic() - t

    def take_channel_stream(self, name: str) -> socket.socket | None:
        """The stream for this kernel channel that the keeper opened before the claim (each is
        taken once; the rest close with the claim)."""
        fd = self.claim.channel_fds.pop(name, None)
        return socket.socket(fileno=fd) if fd is not None else None

    def diagnostics(self, limit: int = 3000) -> str:
        text = (runtime.read_trusted(self.paths.console_log, limit, tail=True) or "").strip()
        return f"--- console.log (last lines) ---\n{text}" if text else ""

    def _kill_guest(self) -> None:
        self.qemu.kill()

    async def _qemu_went_first(self, proc: Any) -> str | None:
        """The keeper's reason, if QEMU ended before `proc` (the virtiofsd started here exits when
        QEMU hangs up on it): the keeper says why in a moment."""
        if proc is self.qemu:
            return None
        if getattr(proc, "returncode", None) == 0:
            # a clean exit is virtiofsd seeing QEMU hang up: QEMU's files close before its exit shows
            # on its pidfd, so give that a moment (else a dead vsock backend was reported as virtiofsd)
            deadline = time.monotonic() + QEMU_EXIT_WAIT
            while self.qemu.qemu_alive() and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
        if self.qemu.qemu_alive():
            return None
        return await self.qemu.said_why(CAUSE_WAIT)

    async def _stop(self, grace: float) -> None:
        await self._end_helper_watches()
        try:
            if self.attaching is not None:
                self.attaching.cancel()
                await asyncio.gather(self.attaching, return_exceptions=True)
            if self._monitor_opening is not None:
                self._monitor_opening.cancel()
                await asyncio.gather(self._monitor_opening, return_exceptions=True)
            await self._shut_down(grace)  # what is left, the keeper forces
            await self._close_monitor()
            if self.control:
                await self.control.close()
            await self.qemu.release(grace=30)
            await self._close_helpers()
            # the keeper removes its VM dir when it tears down; a SIGKILLed keeper cannot: its dir
            # (sockets, logs, pid files) goes now, not at the next boot's sweep (issue 21 chaos)
            runtime.sweep_stale()
        finally:
            self.claim.close()

    def kill_now(self) -> None:
        if self.attaching is not None:
            self.attaching.cancel()
        for proc in self.helpers:
            proc.kill_now()
        self.claim.close()
        self._stop_began = True


if TYPE_CHECKING:  # mypy (`make unit`) checks that a claimed VM is what KernelVM drives
    _CLAIMED_VM_IS_A_GUEST_VM: type[GuestVM] = ClaimedVM
