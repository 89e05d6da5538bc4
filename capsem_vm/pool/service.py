"""The pool service: keeps VMs of one or more flavours (memory, CPUs, image) booted and warm, hands
them out on claim.

    capsem pool start [--size N] [--memory MB] [--cpus N] [--flavour MB,CPUS,N[,IMAGE] ...] [--image I] [--foreground]

Its control socket `<runtime dir>/pool/pool.sock` (dir 0700, socket 0600, SOCK_SEQPACKET) is the
only way to claim a VM; each connection's peer credentials (SO_PEERCRED) must be this user's, or
it is closed unanswered. One request per connection: claim | status | stop (wire.py).

Each pooled VM is owned by its keeper process (keeper.py), not by the pool: the pool only holds
the owner end of the keeper's socketpair. A claim passes that end to the claimer and closes the
pool's copy, so a claimed VM's life is tied to the claimer from then on and the pool dying changes
nothing for it. Unclaimed VMs die with the pool (their owner end closes with it). Keepers are
started without PDEATHSIG (that would kill claimed VMs with the pool) in their own session; the
pool reaps them while it lives.

Refill: after a claim (REFILL_AFTER_CLAIM_S later) or a lost VM, boot more until each flavour has
its count (flavours in turn, at most `parallel` boots at once in all, never beyond the memory
budget: the pooled VMs' memory together <= budget_mb; wire.plan_boots).
Boots that fail before ready back off exponentially (up to BACKOFF_MAX_S); `capsem pool status`
shows the VMs meanwhile.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from .. import nofollow, paths, runtime
from ..config import VMConfig
from ..errors import VMError
from ..process import ManagedProcess
from . import priority, seqpacket, wire
from .config import PoolConfig
from .keeper import PREWARM_WAIT, keeper_argv, qemu_rss_kb

log = logging.getLogger("capsem.pool")
REQUEST_TIMEOUT = 10.0
STALE_CHECK_S = 10.0
BACKOFF_MAX_S = 120.0
# A claim's refill waits this long, and boots under way pause as long (priority.py): the claimed
# kernel attaches its folder and answers its first messages in the next second or so, and boots
# (a core's worth of emulated CPU each) running at the same moment slowed that down by half on a
# 2-core host.
REFILL_AFTER_CLAIM_S = priority.PAUSE_S


def pool_dir() -> Path:
    return paths.ensure_private_dir(paths.runtime_dir() / "pool")


def socket_path() -> Path:
    return pool_dir() / "pool.sock"


@dataclass
class Pooled:
    id: str
    proc: ManagedProcess
    owner: socket.socket
    born: float
    shape: wire.Shape
    state: str = "booting"
    ready: dict = field(default_factory=dict)
    watch: asyncio.Task | None = None

    def slot(self) -> wire.Slot:
        fl = self.ready.get("flavour")
        return wire.Slot(self.id, self.state, self.born, wire.Flavour.from_wire(fl) if fl else None)


def _image_digest(image: str | None) -> str:
    """The identity of `image` (its manifest's sha256), as a claim's flavour names it."""
    from ..image.store import resolve_image
    from ..image.verify import read_manifest
    return read_manifest(resolve_image(image))[1]


def _digest_or_none(image: str | None) -> str | None:
    try:
        return _image_digest(image)
    except Exception:  # noqa: BLE001 - missing or broken: serves nothing (its boots say why)
        return None


class Pool:
    def __init__(self, config: PoolConfig):
        self.config = config
        self.vms: dict[str, Pooled] = {}
        self.handed_out: set[ManagedProcess] = set()
        self.claims = 0
        self.stopping = asyncio.Event()
        self._seq = 0
        self._tasks: set[asyncio.Task] = set()
        self.started = time.monotonic()
        self.failures = 0            # boots in a row that never became ready
        self.boot_pause = priority.BootPause(REFILL_AFTER_CLAIM_S)
        self._hold_until = 0.0       # no new boots before this (backoff after failures)

    # --- serving -----------------------------------------------------------------------------

    async def serve(self) -> None:
        path = socket_path()
        if await _answers(path):
            raise VMError(f"a capsem pool already runs for this user ({path})", "capsem pool stop")
        try:
            path.unlink()
        except FileNotFoundError:
            pass
        listener = seqpacket.new_socket()
        old = os.umask(0o177)
        try:
            listener.bind(str(path))
        finally:
            os.umask(old)
        nofollow.chmod(path, 0o600)
        listener.listen(64)
        # pid and start time: the start-up sweep (sweep.py) tells this pool from a reused pid
        (path.parent / "pool.pid").write_text(f"{os.getpid()} {runtime._start_time(os.getpid())}\n")
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.add_signal_handler(sig, self.stopping.set)
        log.info("pool serving on %s (%s)", path, ", ".join(s.label() for s in self.config.shapes))
        self.refill()
        self._spawn(self._retire_stale())
        accept = None
        try:
            while not self.stopping.is_set():
                accept = asyncio.ensure_future(loop.sock_accept(listener))
                stop = asyncio.ensure_future(self.stopping.wait())
                done, _ = await asyncio.wait({accept, stop}, return_when=asyncio.FIRST_COMPLETED)
                stop.cancel()
                if accept in done:
                    conn, _ = accept.result()
                    self._spawn(self._client(conn))
        finally:
            if accept is not None:
                accept.cancel()
            listener.close()
            for p in (path, path.parent / "pool.pid"):
                try:
                    p.unlink()
                except FileNotFoundError:
                    pass
            await self.shutdown()

    def _spawn(self, coro) -> asyncio.Task:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _client(self, conn: socket.socket) -> None:
        conn.setblocking(False)
        try:
            if seqpacket.peer_uid(conn) != os.geteuid():
                log.warning("refused a pool connection from uid %d", seqpacket.peer_uid(conn))
                return
            try:
                msg, _ = await seqpacket.recv(conn, timeout=REQUEST_TIMEOUT)
            except (wire.WireError, asyncio.TimeoutError, OSError) as exc:
                log.info("bad pool request: %s", exc)
                return
            if msg is None:
                return
            t = msg["t"]
            if t == "claim":
                await self._claim(conn, msg)
            elif t == "status":
                await seqpacket.send(conn, self.status())
            elif t == "stop":
                await seqpacket.send(conn, {"t": "ok"})
                self.stopping.set()
            else:
                await seqpacket.send(conn, {"t": "error", "message": f"unexpected request {t!r}"})
        except (OSError, asyncio.TimeoutError, wire.WireError) as exc:
            log.info("pool client: %s", exc)
        finally:
            conn.close()

    async def _claim(self, conn: socket.socket, msg: dict) -> None:
        try:
            wanted = wire.Flavour.from_wire(msg.get("flavour"))
        except wire.WireError as exc:
            await seqpacket.send(conn, {"t": "error", "message": str(exc)})
            return
        vm_id = wire.pick([v.slot() for v in self.vms.values()], wanted)
        if vm_id is None:
            ready = [v.ready.get("flavour") for v in self.vms.values() if v.state == "ready"]
            booting = sum(v.state == "booting" for v in self.vms.values())
            await seqpacket.send(conn, {"t": "none", "ready": ready, "booting": booting,
                                        "reason": self._no_match(wanted, booting)})
            return
        vm = self.vms.pop(vm_id)
        if vm.watch:
            vm.watch.cancel()
            await asyncio.gather(vm.watch, return_exceptions=True)
        try:
            await seqpacket.send(conn, {"t": "vm", "id": vm.id, **{k: v for k, v in vm.ready.items() if k != "t"}},
                                 fds=(vm.owner.fileno(),))
            self.claims += 1
            self.handed_out.add(vm.proc)
            self._spawn(self._reap(vm.proc))
        finally:
            vm.owner.close()  # handed over (or, if sending failed, the VM goes away with it)
            self.boot_pause.pause([v.proc.pid for v in self.vms.values() if v.state == "booting"])
            asyncio.get_running_loop().call_later(REFILL_AFTER_CLAIM_S + 0.05, self._after_claim)

    def _no_match(self, wanted: wire.Flavour, booting: int) -> str:
        shapes = self.config.shapes
        kept = ", ".join(s.label() for s in shapes)
        sized = [s for s in shapes if (s.memory_mb, s.cpus) == (wanted.memory_mb, wanted.cpus)]
        if not sized:
            return (f"the pool keeps no VMs of {wanted.memory_mb} MB/{wanted.cpus} CPUs (it keeps {kept}; "
                    f"`capsem pool start --flavour {wanted.memory_mb},{wanted.cpus},N[,IMAGE]` would)")
        if not any(_digest_or_none(s.image) == wanted.image_digest for s in sized):
            return (f"the pool keeps no VMs of {wanted.memory_mb} MB/{wanted.cpus} CPUs booted from this kernel's "
                    f"image (it keeps {kept}; `capsem pool start --flavour "
                    f"{wanted.memory_mb},{wanted.cpus},N,IMAGE` with the kernel's image would)")
        return f"no warm VM of this flavour ready ({booting} booting; the pool keeps {kept})"

    def _after_claim(self) -> None:
        if self.boot_pause.resume_if_due():  # not due: a later claim moved the end of the pause
            self.refill()

    async def _reap(self, proc: ManagedProcess) -> None:
        await proc.wait()
        proc.close()
        self.handed_out.discard(proc)

    # --- the VMs -----------------------------------------------------------------------------

    async def _retire_stale(self) -> None:
        """VMs booted from an image that is no longer their flavour's current one (rebuilt, new
        default) can serve no claim: let them go, the refill boots the current image."""
        while not self.stopping.is_set():
            await asyncio.sleep(STALE_CHECK_S)
            digests = {}
            for image in {s.image for s in self.config.shapes}:
                try:
                    digests[image] = await asyncio.to_thread(_image_digest, image)
                except Exception as exc:  # noqa: BLE001 - image gone or broken: boots will say why
                    log.warning("cannot read the image %s: %s", image or "default", exc)
            for vm in list(self.vms.values()):
                fl = vm.ready.get("flavour")
                digest = digests.get(vm.shape.image)
                if vm.state == "ready" and fl and digest and fl.get("image_digest") != digest:
                    log.info("retiring pooled VM %s: its image is not the current one", vm.id)
                    del self.vms[vm.id]
                    if vm.watch:
                        vm.watch.cancel()
                    vm.owner.close()
                    self._spawn(vm.proc.stop(grace=30))
            self.refill()

    def refill(self) -> None:
        if self.stopping.is_set() or time.monotonic() < self._hold_until:
            return
        shapes = self.config.shapes
        ready = [sum(v.shape == s and v.state == "ready" for v in self.vms.values()) for s in shapes]
        booting = [sum(v.shape == s and v.state != "ready" for v in self.vms.values()) for s in shapes]
        for i in wire.plan_boots(list(shapes), ready, booting, self.config.budget, self.config.parallel):
            self._boot_one(shapes[i])

    def _boot_one(self, shape: wire.Shape) -> None:
        self._seq += 1
        vm_id = f"p{os.getpid()}-{self._seq}"
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        c = self.config
        booted = VMConfig(memory_mb=shape.memory_mb, cpus=shape.cpus, accel=c.accel, image=shape.image,
                          boot_timeout=c.boot_timeout)
        argv = [sys.executable, "-m", "capsem_vm.pool.keeper", *keeper_argv(theirs.fileno(), booted)]
        try:
            # no PDEATHSIG (process.py's spawn): a claimed VM must outlive the pool
            popen = subprocess.Popen(argv, pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL,
                                     start_new_session=True, close_fds=True)
        finally:
            theirs.close()
        mine.setblocking(False)
        vm = Pooled(vm_id, ManagedProcess(f"keeper[{vm_id}]", popen), mine, time.monotonic(), shape)
        self.vms[vm_id] = vm
        vm.watch = self._spawn(self._watch(vm))

    async def _watch(self, vm: Pooled) -> None:
        """booting -> ready (the keeper's ready message) -> gone (its socket closed)."""
        try:
            try:
                msg, _ = await seqpacket.recv(vm.owner, timeout=self.config.boot_timeout + PREWARM_WAIT)
            except (wire.WireError, asyncio.TimeoutError, OSError) as exc:
                log.warning("pooled VM %s did not become ready: %s", vm.id, exc)
                msg = None
            if msg is not None and msg["t"] == "ready" and isinstance(msg.get("flavour"), dict):
                try:
                    wire.Flavour.from_wire(msg["flavour"])
                    vm.ready, vm.state = msg, "ready"
                    self.failures = 0
                    log.info("pooled VM %s ready after %.1f s", vm.id, time.monotonic() - vm.born)
                    self.refill()
                    await seqpacket.wait_closed(vm.owner)
                except wire.WireError as exc:
                    log.warning("pooled VM %s: bad ready message: %s", vm.id, exc)
            log.warning("pooled VM %s went away", vm.id)
            if vm.state != "ready":  # a failing boot (bad image, no resources): back off
                self.failures += 1
                delay = wire.backoff(self.failures, BACKOFF_MAX_S)
                self._hold_until = time.monotonic() + delay
                asyncio.get_running_loop().call_later(delay + 0.1, self.refill)
                log.warning("%d pooled boot(s) failed in a row: next boot in %.0f s", self.failures, delay)
        except asyncio.CancelledError:
            raise
        if self.vms.get(vm.id) is vm:  # not claimed: gone for good
            del self.vms[vm.id]
            vm.owner.close()
            await vm.proc.stop(grace=15)
            self.refill()

    def status(self) -> dict:
        now = time.monotonic()
        vms = []
        for v in self.vms.values():
            pid = v.ready.get("qemu_pid")
            rss = qemu_rss_kb(pid) if isinstance(pid, int) else None
            vms.append({"id": v.id, "state": v.state, "age_s": round(now - v.born, 1),
                        "memory_mb": v.shape.memory_mb, "cpus": v.shape.cpus, "image": v.shape.image,
                        "rss_mb": round(rss / 1024, 1) if rss else None, "keeper_pid": v.proc.pid,
                        "qemu_pid": pid, "warm": v.ready.get("warm"),
                        "paused": v.state == "booting" and self.boot_pause.holds(v.proc.pid)})
        c = self.config
        return {"t": "ok", "pid": os.getpid(), "size": c.size, "memory_mb": c.memory_mb, "cpus": c.cpus,
                "flavours": [{"memory_mb": s.memory_mb, "cpus": s.cpus, "size": s.size, "image": s.image}
                             for s in c.shapes],
                "image": c.image, "budget_mb": c.budget, "claims": self.claims,
                "claimed_alive": len(self.handed_out), "uptime_s": round(now - self.started, 1),
                "boots_paused_s": round(self.boot_pause.remaining_s(), 1), "vms": vms}

    async def shutdown(self) -> None:
        self.boot_pause.resume()  # stopped processes would not act on their teardown
        vms, self.vms = list(self.vms.values()), {}
        for v in vms:
            if v.watch:
                v.watch.cancel()
            v.owner.close()  # the keeper sees its owner gone and tears its VM down
        await asyncio.gather(*(v.proc.stop(grace=30) for v in vms), return_exceptions=True)
        # claimed VMs are not ours any more: their keepers stay (reparented) with their claimers


async def _answers(path: Path) -> bool:
    if not path.exists():
        return False
    s = seqpacket.new_socket()
    try:
        await asyncio.wait_for(asyncio.get_running_loop().sock_connect(s, str(path)), 2)
        return True
    except (OSError, asyncio.TimeoutError):
        return False
    finally:
        s.close()


def run_foreground(config: PoolConfig) -> int:
    logging.basicConfig(level=logging.INFO, format="capsem pool: %(message)s")
    logging.getLogger().setLevel(logging.INFO)
    asyncio.run(Pool(config).serve())
    return 0
