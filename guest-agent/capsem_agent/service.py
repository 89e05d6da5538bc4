"""The agent's control service: one connection to the host, requests in, replies and events out.

Connection lifetime = service lifetime: when the host goes away or asks for shutdown the service
returns, and PID 1 powers the VM off.
"""

from __future__ import annotations

import asyncio
import os
import signal as _signal

from . import BOOT_MARKS, __version__, execs, ipykernel_host, mounts, protocol, relay, sysinit, transport

READ_CHUNK = 64 * 1024
MOUNT_TIMEOUT = 30.0
FILE_TIMEOUT = 60.0  # one chunk of a file request (bounded size); a stuck share is an error
EGRESS_TIMEOUT = 60.0  # module loading + nft under TCG take a second or two; never a minute


def _uptime() -> float | None:
    try:
        with open("/proc/uptime") as f:
            return float(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def boot_times() -> dict:
    kernel_s = init_s = None
    try:
        with open(os.path.join(ipykernel_host.rundir(), "init-times")) as f:
            vals = [float(x) for x in f.read(256).split()[:2]]
        kernel_s, init_s = vals[0], vals[1]
    except (OSError, ValueError, IndexError):
        pass
    return {"kernel_s": kernel_s, "init_s": init_s, **BOOT_MARKS, "agent_s": _uptime()}


def _wants_prewarm() -> str | None:
    """None, "1" (import ipykernel at boot) or "preinit" (also initialise the kernel app)."""
    if os.environ.get("CAPSEM_AGENT_PREWARM") in ("1", "preinit"):
        return os.environ["CAPSEM_AGENT_PREWARM"]
    try:
        with open("/proc/cmdline") as f:
            words = f.read(4096).split()
    except OSError:
        return None
    for mode in ("1", "preinit"):
        if f"capsem.prewarm={mode}" in words:
            return mode
    return None


class Service:
    def __init__(self):
        self.writer: asyncio.StreamWriter | None = None
        self.closed = False
        self.execs: dict[int, execs.ExecSession] = {}
        self.kernels = ipykernel_host.IPyKernelHost(self.send)
        self.egress = None  # egress.Egress, imported on first egress_setup (keeps boot lean)
        self._tasks: set[asyncio.Task] = set()
        self._stop = False

    # --- output ------------------------------------------------------------------------------
    async def send(self, msg: dict) -> None:
        """Write one frame and wait for the transport to drain (the flow-control point)."""
        if self.closed:
            return
        try:
            self.writer.write(protocol.encode(msg))
            await self.writer.drain()
        except (ConnectionError, OSError):
            self.closed = True

    def _spawn(self, coro) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # --- main loop ---------------------------------------------------------------------------
    async def run(self) -> int:
        try:
            listener = transport.listen(transport.channels_address())
            relay.ChannelServer(listener, self.kernels).start()
        except OSError as exc:
            sysinit.log(f"channel listener unavailable: {exc}")
        if mode := _wants_prewarm():
            try:
                self.kernels.prewarm(preinit=mode == "preinit")
            except OSError as exc:
                sysinit.log(f"prewarm failed: {exc}")
        loop = asyncio.get_running_loop()
        sock = await loop.run_in_executor(None, transport.connect, transport.control_address())
        reader, self.writer = await asyncio.open_connection(sock=sock, limit=READ_CHUNK)
        await self.send({"t": "hello", "v": protocol.PROTOCOL_VERSION, "agent": __version__,
                         "boot": boot_times()})
        # mount(2) goes through ctypes, whose import takes ~75 ms under TCG: load it now, not
        # under the clock of the first mount (a pooled VM's is at claim time)
        loop.run_in_executor(None, mounts.libc)
        decoder = protocol.FrameDecoder()
        try:
            while not self._stop and not self.closed:
                data = await reader.read(READ_CHUNK)
                if not data:
                    break
                try:
                    bodies = decoder.feed(data)
                except protocol.FrameError as exc:
                    for body in exc.bodies:
                        await self._handle_body(body)
                    await self.send(protocol.error("bad_frame", str(exc)))
                    break  # the stream cannot be resynchronised
                for body in bodies:
                    await self._handle_body(body)
                    if self._stop:
                        break
        finally:
            await self._teardown()
        return 0

    async def _teardown(self) -> None:
        for session in list(self.execs.values()):
            session.kill()
        self.kernels.kill_all()
        for task in list(self._tasks):
            task.cancel()
        if self.writer is not None:
            try:
                await asyncio.wait_for(self.writer.drain(), 2.0)
            except (asyncio.TimeoutError, ConnectionError, OSError):
                pass
            self.writer.close()

    async def _handle_body(self, body: bytes) -> None:
        msg_id = None
        try:
            msg = protocol.decode_body(body)
            msg_id = msg.get("id")
        except protocol.MessageError as exc:
            await self.send(protocol.error("bad_message", str(exc), exc.msg_id))
            return
        handler = self.HANDLERS.get(msg["t"])
        if handler is None:
            await self.send(protocol.error("unknown_type", f"unknown message type {msg['t'][:64]!r}", msg_id))
            return
        if msg_id is None:
            await self.send(protocol.error("bad_message", f"{msg['t'][:64]}: request needs an integer 'id'"))
            return
        if msg["t"] in self.SLOW:
            self._spawn(self._guarded(msg_id, handler(self, msg)))  # keep serving meanwhile
        else:
            await self._guarded(msg_id, handler(self, msg))

    async def _guarded(self, msg_id: int, coro) -> None:
        """Run one handler; whatever goes wrong becomes an error reply, never a dead agent."""
        try:
            await coro
        except protocol.MessageError as exc:
            await self.send(protocol.error("bad_message", str(exc), exc.msg_id if exc.msg_id is not None else msg_id))
        except execs.StdinOverflow:
            await self.send(protocol.error("stdin_overflow", "stdin window full; data dropped", msg_id))
        except ipykernel_host.KernelRunning:
            await self.send(protocol.error("kernel_running", "a kernel is already running", msg_id))
        except ipykernel_host.NoKernel:
            await self.send(protocol.error("no_kernel", "no kernel is running", msg_id))
        except ipykernel_host.CannotHold:
            await self.send(protocol.error("cannot_hold", "hold needs the pre-initialised kernel, which is "
                                           "gone or unusable for this uid/env: start without hold", msg_id))
        except ipykernel_host.NothingHeld:
            await self.send(protocol.error("not_held", "the kernel holds no requests", msg_id))
        except ProcessLookupError:
            await self.send(protocol.error("no_process", "the process is gone", msg_id))
        except asyncio.TimeoutError:
            await self.send(protocol.error("timeout", "the operation timed out", msg_id))
        except OSError as exc:
            await self.send(protocol.error("os_error", f"{exc.__class__.__name__}: {exc}", msg_id))
        except Exception as exc:  # noqa: BLE001 - a handler bug must not kill the agent
            await self.send(protocol.error("internal", f"{exc.__class__.__name__}: {exc}", msg_id))

    # --- handlers ----------------------------------------------------------------------------
    async def _ping(self, msg):
        await self.send({"t": "pong", "id": msg["id"]})

    async def _exec(self, msg):
        msg_id = msg["id"]
        if msg_id in self.execs:
            await self.send(protocol.error("duplicate_id", f"exec {msg_id} is still running", msg_id))
            return
        if len(self.execs) >= execs.MAX_EXECS:
            await self.send(protocol.error("too_many", "too many running execs", msg_id))
            return
        session = execs.ExecSession(msg_id, self.send)
        try:
            session.spawn(msg)
        except (OSError, subprocess_error()) as exc:
            await self.send(protocol.error("spawn_failed", f"{exc.__class__.__name__}: {exc}", msg_id))
            return
        self.execs[msg_id] = session
        try:
            await session.attach()
        except OSError as exc:
            session.kill()
            await self.send(protocol.error("os_error", f"exec stdin: {exc}", msg_id))
        await self.send({"t": "started", "id": msg_id, "pid": session.proc.pid})

        async def run():
            try:
                await session.run()
            except Exception as exc:  # noqa: BLE001 - report, keep serving
                session.kill()
                await self.send(protocol.error("internal", f"exec: {exc.__class__.__name__}: {exc}", msg_id))
            finally:
                self.execs.pop(msg_id, None)
        self._spawn(run())

    def _session(self, msg) -> execs.ExecSession:
        session = self.execs.get(msg["id"])
        if session is None:
            raise protocol.MessageError(f"{msg['t']}: no running exec with id {msg['id']}", msg["id"])
        return session

    async def _stdin(self, msg):
        session = self._session(msg)
        data = protocol.req_data(msg, "data", optional=True)
        session.write_stdin(data, protocol.req_bool(msg, "eof"))

    async def _resize(self, msg):
        rows = protocol.req_int(msg, "rows", lo=1, hi=10000)
        cols = protocol.req_int(msg, "cols", lo=1, hi=10000)
        self._session(msg).resize(rows, cols)

    async def _signal(self, msg):
        signum = protocol.req_int(msg, "signum", lo=1, hi=64)
        target = msg.get("target")
        if target == "kernel":
            self.kernels.signal(signum)
        elif isinstance(target, int) and not isinstance(target, bool):
            session = self.execs.get(target)
            if session is None:
                raise protocol.MessageError(f"signal: no running exec with id {target}", msg["id"])
            session.signal(signum)
        else:
            raise protocol.MessageError("signal: 'target' must be an exec id or \"kernel\"", msg["id"])
        await self.send({"t": "ok", "id": msg["id"]})

    async def _mount(self, msg):
        tag = protocol.req_str(msg, "tag", max_len=36)  # virtio-fs tags are at most 36 bytes
        path = protocol.req_str(msg, "path", max_len=4096)
        readonly = protocol.req_bool(msg, "readonly")
        wait = protocol.req_int(msg, "wait", optional=True, lo=0, hi=int(MOUNT_TIMEOUT) - 5) or 0
        if not path.startswith("/"):
            raise protocol.MessageError("mount: 'path' must be absolute", msg["id"])
        loop = asyncio.get_running_loop()
        await asyncio.wait_for(loop.run_in_executor(None, mounts.mount_virtiofs_when_present, tag, path,
                                                    readonly, float(wait)), MOUNT_TIMEOUT)
        await self.send({"t": "ok", "id": msg["id"]})

    async def _egress_setup(self, msg):
        from . import egress
        if self.egress is None:
            self.egress = egress.Egress()
        loop = asyncio.get_running_loop()
        try:
            info = await asyncio.wait_for(loop.run_in_executor(None, self.egress.setup, msg), EGRESS_TIMEOUT)
        except egress.netsetup.NetSetupError as exc:
            await self.send(protocol.error("egress_failed", str(exc), msg["id"]))
            return
        await self.send({"t": "ok", "id": msg["id"], **info})

    async def _egress_prepare(self, msg):
        from . import egress
        if self.egress is None:
            self.egress = egress.Egress()
        ca_pem = protocol.req_str(msg, "ca_pem", optional=True, max_len=egress.trust.MAX_PEM)
        loop = asyncio.get_running_loop()
        try:
            info = await asyncio.wait_for(loop.run_in_executor(None, self.egress.prepare, ca_pem), EGRESS_TIMEOUT)
        except egress.trust.TrustError as exc:
            raise protocol.MessageError(f"egress_prepare: {exc}", msg["id"]) from None
        except egress.netsetup.NetSetupError as exc:
            await self.send(protocol.error("egress_failed", str(exc), msg["id"]))
            return
        await self.send({"t": "ok", "id": msg["id"], **info})

    async def _kernel_start(self, msg):
        k = await self.kernels.start(msg)
        # listening: the kernel runs and accepts connections (a warmed-up preinit kernel; the
        # relay carries them once it took the host's key); the host can skip its port probe
        await self.send({"t": "ok", "id": msg["id"], "pid": k.pid, "warm": k.warm,
                         "listening": k.listening})

    async def _kernel_release(self, msg):
        self.kernels.release()
        await self.send({"t": "ok", "id": msg["id"]})

    async def _kernel_prewarm(self, msg):
        pid = self.kernels.prewarm(preinit=protocol.req_bool(msg, "preinit"))
        reply = {"t": "ok", "id": msg["id"], "pid": pid}
        wait = protocol.req_int(msg, "wait", optional=True, lo=0, hi=600)
        if wait:  # seconds to wait for the warm process's imports
            reply["ready"] = await self.kernels.wait_warm(float(wait))
        await self.send(reply)

    async def _reclaim(self, msg):
        from . import reclaim
        info = await asyncio.get_running_loop().run_in_executor(None, reclaim.reclaim)
        await self.send({"t": "ok", "id": msg["id"], **info})

    async def _file(self, msg):
        from . import files_op
        loop = asyncio.get_running_loop()
        try:
            fields = await asyncio.wait_for(loop.run_in_executor(None, files_op.handle, msg), FILE_TIMEOUT)
        except files_op.FileOpError as exc:
            await self.send(protocol.error(exc.code, str(exc), msg["id"]))
            return
        await self.send({"t": "ok", "id": msg["id"], **fields})

    async def _shutdown(self, msg):
        await self.send({"t": "ok", "id": msg["id"]})
        self._stop = True

    SLOW = frozenset({"mount", "egress_setup", "egress_prepare", "kernel_prewarm", "kernel_start", "file",
                      "reclaim"})  # may block or wait: own task
    HANDLERS = {
        "ping": _ping, "exec": _exec, "stdin": _stdin, "resize": _resize, "signal": _signal,
        "mount": _mount, "egress_setup": _egress_setup, "egress_prepare": _egress_prepare, "kernel_start": _kernel_start,
        "kernel_prewarm": _kernel_prewarm, "kernel_release": _kernel_release,
        "file": _file, "reclaim": _reclaim, "shutdown": _shutdown,
    }


def subprocess_error():
    import subprocess
    return subprocess.SubprocessError


def main() -> int:
    # SIGPIPE stays ignored (Python's default) so a vanished peer is an exception, not a death.
    _signal.signal(_signal.SIGPIPE, _signal.SIG_IGN)
    try:
        return asyncio.run(Service().run())
    except KeyboardInterrupt:
        return 130
    except OSError as exc:
        sysinit.log(f"control connection failed: {exc}")
        return 1
