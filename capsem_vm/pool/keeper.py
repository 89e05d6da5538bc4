"""The keeper: a small process that owns one pooled VM (QEMU and its helpers are its children,
with PDEATHSIG) and lives exactly as long as its *owner socket* has a peer.

    python -m capsem_vm.pool.keeper --fd N --memory MB --cpus N [--image I] [--accel A]

fd N is one end of a SOCK_SEQPACKET socketpair; whoever holds the other end owns the VM. The pool
creates the pair and keeps its end; a claim passes that end to the claimer (SCM_RIGHTS) and the
pool closes its copy, so ownership moves without the keeper noticing. When the owner end closes
(owner exited, crashed or was killed) the keeper tears the VM down and exits. Messages on it:

    keeper -> owner  ready {flavour, vm_dir, qemu_pid, uid, gid, hello, timings, warm}
    owner -> keeper  handover            -> vm {.., channels: [names]} + the agent's control
                                            connection, then one channel stream per name
    owner -> keeper  info                -> info {rss_kb, age_s, claimed}
    owner -> keeper  kill                   QEMU is SIGKILLed (a helper the claimer runs for the VM
                                            died: no graceful power-off, see vm_base.py)
    keeper -> owner  died {reason}          the VM ended on its own (QEMU or the vsock backend
                                            exited), sent just before the keeper tears down and exits

The keeper boots the VM with VM.start() (so the image is verified through the fds QEMU reads, as
for a cold VM), with no share, no egress and no kernel key; the guest agent pre-starts ipykernel
(kernel_prewarm {preinit}: imported, initialised and running with a throw-away key, see
capsem_agent.ipykernel_host) and the keeper reports ready once that is done; egress_prepare sets up the
policy-independent part of egress. It also opens one primed channel stream per kernel channel (vsock
port 5001, the channel named, a front end's ZMTP greeting sent): the agent joins each to the
pre-started kernel, which greets back, and lets nothing more through until the claimer's kernel
took its key; the claimer's first connection on every channel then needs no new stream and no
handshake round trip to the guest (see capsem_kernel.channels).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import socket
import sys
import time

from capsem_agent import protocol

from .. import confine
from ..config import VMConfig
from ..control import detach_fd
from ..proxy.ca import ca_cert_pem
from ..vm import VM
from . import seqpacket, wire

log = logging.getLogger("capsem.pool.keeper")
PREWARM_WAIT = 600  # s: ipykernel's imports under a loaded TCG host


def qemu_rss_kb(pid: int | None) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except (OSError, ValueError, TypeError):
        pass
    return None


class Keeper:
    def __init__(self, owner: socket.socket, config: VMConfig):
        self.owner = owner
        self.vm = VM(config, vsock="vhost-user")  # the claimer reaches it by paths (claimed.py)
        self.born = time.monotonic()
        self.claimed = False
        self.channel_fds: dict[str, int] = {}  # channel name -> stream opened before the claim

    async def run(self) -> int:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.add_signal_handler(sig, stop.set)
        try:
            boot = asyncio.ensure_future(self._boot())
            gone = asyncio.ensure_future(seqpacket.wait_closed(self.owner))
            stopped = asyncio.ensure_future(stop.wait())
            done, _ = await asyncio.wait({boot, gone, stopped}, return_when=asyncio.FIRST_COMPLETED)
            if boot not in done:
                boot.cancel()
                await asyncio.gather(boot, return_exceptions=True)
                return 0
            gone.cancel()
            boot.result()  # raises a boot error
            await seqpacket.send(self.owner, self._ready_msg())
            await self._serve(stop, stopped)
            return 0
        except Exception as exc:  # noqa: BLE001 - reported, then the VM goes away
            log.error("pooled VM failed: %s", exc)
            return 1
        finally:
            self._close_channel_fds()
            await self.vm.stop(grace=3)
            self.owner.close()

    async def _boot(self) -> None:
        await self.vm.start()
        # the warm kernel process's imports, and egress_setup's policy-independent part (listeners,
        # nftables; nothing gets out before the claimer listens on the egress ports) with the
        # user's CA certificate (public, the same for every kernel: egress_setup then skips it)
        ca_pem = (await asyncio.to_thread(ca_cert_pem)).decode()
        reply, _ = await asyncio.gather(
            self.vm.control.request({"t": "kernel_prewarm", "wait": PREWARM_WAIT, "preinit": True},
                                    timeout=PREWARM_WAIT + 30),
            self.vm.control.request({"t": "egress_prepare", "ca_pem": ca_pem}, timeout=PREWARM_WAIT))
        self.warm = bool(reply.get("ready"))
        if not self.warm:
            log.warning("the guest's warm kernel process did not finish its imports")
        else:  # (the agent primes streams only for a warm pre-started kernel)
            await self._open_channel_streams()
        await self._reclaim_guest_memory()

    async def _reclaim_guest_memory(self) -> None:
        """The guest drops what boot and warm-up left in its caches; free page reporting then
        returns it to the host (capsem_agent.reclaim). Best effort: a VM that could not is still
        a working pooled VM, only a bigger one."""
        try:
            reply = await self.vm.control.request({"t": "reclaim"}, timeout=60)
        except Exception as exc:  # noqa: BLE001 - logged, the VM stays usable
            log.warning("the guest could not reclaim its caches: %s", exc)
            return
        self.vm.timings["reclaim_s"] = reply.get("seconds")

    async def _open_channel_streams(self) -> None:
        """One primed channel stream per kernel channel, kept as plain fds (never read here: what
        the guest sends on them is the claimer's to check). Best effort: a channel without one,
        or whose stream the agent closed (it primes only for a warm pre-started kernel), is
        connected at claim time as for a cold VM."""
        for name in protocol.KERNEL_CHANNELS:
            try:
                reader, writer = await self.vm.transport.connect(protocol.PORT_CHANNELS, timeout=30)
                writer.write(protocol.encode({"t": "channel", "name": name, "prime": True}) + protocol.ZMTP_GREETING)
                await writer.drain()
            except (OSError, asyncio.TimeoutError) as exc:
                log.warning("could not open the %s channel stream before the claim: %s", name, exc)
                continue
            fd = detach_fd(reader, writer)  # the stream stays open for the claimer
            if fd is None:  # bytes behind the vsock handshake: not ours to drop
                writer.close()
                continue
            self.channel_fds[name] = fd

    def _close_channel_fds(self) -> None:
        for fd in self.channel_fds.values():
            os.close(fd)
        self.channel_fds.clear()

    def _ready_msg(self) -> dict:
        vm = self.vm
        ident = vm.identity
        return {"t": "ready", "flavour": wire.Flavour(vm.config.memory_mb, vm.config.cpus, vm.image_digest,
                                                      vm.accel.accel).to_wire(),
                "vm_dir": str(vm.paths.root), "qemu_pid": confine.program_pid(vm.qemu.pid), "keeper_pid": os.getpid(),
                "uid": ident.uid if ident else None, "gid": ident.gid if ident else None,
                "hello": vm.hello, "timings": vm.timings, "warm": self.warm}

    async def _serve(self, stop: asyncio.Event, stopped: asyncio.Future) -> None:
        qemu_exit = asyncio.ensure_future(self.vm.qemu.wait())
        try:
            while True:
                req = asyncio.ensure_future(seqpacket.recv(self.owner))
                done, _ = await asyncio.wait({req, qemu_exit, stopped}, return_when=asyncio.FIRST_COMPLETED)
                if req not in done:
                    req.cancel()
                    await asyncio.gather(req, return_exceptions=True)
                    if qemu_exit in done:
                        await self._report_death()
                    return
                try:
                    msg, _ = req.result()
                except (wire.WireError, OSError) as exc:
                    log.warning("owner sent a bad message: %s", exc)
                    return
                if msg is None:
                    return  # the owner is gone: so is the VM
                await self._handle(msg)
        finally:
            qemu_exit.cancel()

    def death_reason(self) -> str:
        """Why the VM ended without its owner asking: a helper of ours (the vsock backend: the VM's
        own watch, vm_base.py) or QEMU itself."""
        vm = self.vm
        return vm.death_reason or vm._qemu_exit_reason(vm.qemu.returncode)

    async def _report_death(self) -> None:
        reason = self.death_reason()
        log.warning("pooled VM ended: %s", reason)
        try:
            await seqpacket.send(self.owner, {"t": "died", "reason": reason[:1000]}, timeout=1)
        except (OSError, asyncio.TimeoutError, wire.WireError):
            pass  # the owner is gone too

    async def _handle(self, msg: dict) -> None:
        t = msg["t"]
        if t == "handover" and not self.claimed:
            self.claimed = True
            fd = await self.vm.control.detach()
            self.vm.control = None  # from now on the claimer speaks to the agent; we only keep QEMU
            names = list(self.channel_fds)
            try:
                await seqpacket.send(self.owner, {**self._ready_msg(), "t": "vm", "channels": names},
                                     fds=(fd, *(self.channel_fds[n] for n in names)))
            finally:
                os.close(fd)
                self._close_channel_fds()  # the claimer has its own copies now
        elif t == "kill":
            log.warning("the owner asked to kill the VM")
            self.vm.qemu.send_signal(signal.SIGKILL)  # _serve sees QEMU's exit and returns
        elif t == "info":
            await seqpacket.send(self.owner, {"t": "info", "rss_kb": qemu_rss_kb(confine.program_pid(self.vm.qemu.pid)),
                                              "age_s": time.monotonic() - self.born, "claimed": self.claimed})
        else:
            await seqpacket.send(self.owner, {"t": "error", "message": f"unexpected {t!r}"})


def keeper_argv(fd: int, config: VMConfig) -> list[str]:
    """The options parse_keeper_args turns back into (fd, config). Only what a pooled VM boots
    with travels (memory, CPUs, accelerator, image, boot timeout): shares and egress come at claim."""
    return [f"--fd={fd}", f"--memory={config.memory_mb}", f"--cpus={config.cpus}", f"--accel={config.accel}",
            f"--boot-timeout={config.boot_timeout!r}"] + ([f"--image={config.image}"] if config.image else [])


def parse_keeper_args(argv: list[str] | None) -> tuple[int, VMConfig]:
    p = argparse.ArgumentParser(prog="capsem-pool-keeper")
    p.add_argument("--fd", type=int, required=True)
    p.add_argument("--memory", type=int, required=True)
    p.add_argument("--cpus", type=int, required=True)
    p.add_argument("--image", default=None)
    p.add_argument("--accel", default="auto")
    p.add_argument("--boot-timeout", type=float, default=300.0)
    args = p.parse_args(argv)
    return args.fd, VMConfig(memory_mb=args.memory, cpus=args.cpus, accel=args.accel, image=args.image,
                             boot_timeout=args.boot_timeout)


def main(argv: list[str] | None = None) -> int:
    fd, config = parse_keeper_args(argv)
    logging.basicConfig(level=logging.INFO, format=f"capsem pool keeper {os.getpid()}: %(message)s")
    owner = socket.socket(fileno=fd)
    if owner.type != socket.SOCK_SEQPACKET:
        print("keeper: --fd is not a seqpacket socket", file=sys.stderr)
        return 2
    owner.setblocking(False)
    return asyncio.run(Keeper(owner, config).run())


if __name__ == "__main__":
    sys.exit(main())
