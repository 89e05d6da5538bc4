"""Host side of the agent's control protocol (see capsem_agent.protocol).

One `ControlConnection` per VM. A reader task decodes the guest's frames (hostile input: bounded
by the protocol's frame limit) and routes them: replies to the request that waits for them, exec
output to that exec's queue, unsolicited events (kernel_exit) to a callback.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import logging
from collections.abc import AsyncIterator, Callable

from capsem_agent import protocol

from . import safetext
from .errors import ProtocolError, VMError

log = logging.getLogger(__name__)

HELLO_FIELDS = ("v", "agent", "boot")
EXEC_QUEUE = 64  # frames; a slow consumer applies backpressure to the guest instead of buffering
REPLY_TYPES = ("ok", "error", "pong", "started")


class RemoteError(VMError):
    def __init__(self, code: str, message: str):
        super().__init__(f"guest agent error ({code}): {message}")
        self.code = code


class ExecResult:
    def __init__(self, code: int, signal: int | None):
        self.code = code
        self.signal = signal

    @property
    def shell_code(self) -> int:
        """Exit status as a shell reports it (128 + signal for a killed process)."""
        return 128 + self.signal if self.signal else self.code


def detach_fd(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> int | None:
    """A duplicate of the stream's socket fd, for another process (SCM_RIGHTS), and our asyncio
    side closed: no shutdown(), so the peer sees nothing. None, with nothing closed, if the reader
    already holds bytes of the stream: they would be lost to whoever takes the fd."""
    if len(getattr(reader, "_buffer", b"")):  # StreamReader keeps no public size
        return None
    fd = os.dup(writer.get_extra_info("socket").fileno())
    writer.close()
    return fd


class ControlConnection:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader = reader
        self.writer = writer
        self.hello: dict | None = None
        self._ids = itertools.count(1)
        self._waiters: dict[int, asyncio.Future] = {}
        self._exec_queues: dict[int, asyncio.Queue] = {}
        self._decoder = protocol.FrameDecoder()
        self._reader_task: asyncio.Task | None = None
        self._write_lock = asyncio.Lock()
        self._pending: list[dict] = []  # decoded messages not yet dispatched
        self.closed = asyncio.Event()
        self.on_event: Callable[[dict], None] | None = None

    # --- lifecycle ---------------------------------------------------------------------------

    async def read_hello(self, timeout: float) -> dict:
        msg = await asyncio.wait_for(self._read_one(), timeout)
        if msg.get("t") != "hello" or any(k not in msg for k in HELLO_FIELDS):
            raise ProtocolError("the guest's first control message is not a valid hello: "
                                + safetext.escape(str(msg)[:200]))
        if msg["v"] != protocol.PROTOCOL_VERSION:
            raise ProtocolError(f"guest agent speaks protocol v{safetext.escape(str(msg['v'])[:40])}, host speaks v{protocol.PROTOCOL_VERSION}",
                                "rebuild the image with `capsem image build`")
        self.adopt(msg)
        return msg

    def adopt(self, hello: dict) -> None:
        """Start serving a connection whose hello was read elsewhere (a pooled VM's keeper read
        it, then passed the connection's fd over: see capsem_vm.pool)."""
        self.hello = hello
        self._reader_task = asyncio.get_running_loop().create_task(self._read_loop())

    async def detach(self) -> int:
        """Stop using this connection and return a duplicate of its socket's fd, for another
        process to adopt(). Only between requests: refused if anything is pending or buffered."""
        if self._waiters or self._exec_queues:
            raise VMError("control connection busy: cannot hand it over")
        await self._stop_reader()
        fd = None if self._pending or self._decoder.pending else detach_fd(self.reader, self.writer)
        if fd is None:
            raise VMError("the guest sent data during the hand-over: not handing over a desynchronised stream")
        self.on_event = None
        self.closed.set()
        return fd

    async def _stop_reader(self) -> None:
        if self._reader_task:
            self._reader_task.cancel()
            try:
                await self._reader_task
            except (asyncio.CancelledError, Exception):
                pass
            self._reader_task = None

    async def close(self) -> None:
        await self._stop_reader()
        self.writer.close()
        self._fail_all(VMError("control connection closed"))
        self.closed.set()

    # --- reading -----------------------------------------------------------------------------

    async def _read_one(self) -> dict:
        while True:
            if self._pending:
                return self._pending.pop(0)
            data = await self.reader.read(65536)
            if not data:
                raise VMError("the guest closed the control connection")
            bodies = self._decoder.feed(data)  # FrameError -> caller tears the VM down
            self._pending = [protocol.decode_body(b) for b in bodies]

    async def _read_loop(self) -> None:
        try:
            while True:
                msg = await self._read_one()
                await self._dispatch(msg)
        except (protocol.FrameError, protocol.MessageError) as exc:
            log.error("guest broke the control protocol: %s", safetext.escape(str(exc)))
            self._fail_all(ProtocolError(f"guest broke the control protocol: {exc}"))
        except (VMError, ConnectionError) as exc:
            self._fail_all(exc if isinstance(exc, VMError) else VMError(str(exc)))
        except Exception as exc:  # noqa: BLE001 - fail closed: a host bug must not leave callers hanging
            log.exception("control reader failed on guest input")
            self._fail_all(ProtocolError(f"control reader failed: {exc.__class__.__name__}"))
        finally:
            self.closed.set()
            if self.on_event:
                self.on_event({"t": "closed"})

    async def _dispatch(self, msg: dict) -> None:
        t = msg["t"]
        msg_id = msg.get("id")
        if msg_id in self._exec_queues and t in ("out", "exit", "error", "started"):
            queue = self._exec_queues[msg_id]
            if t == "started" and msg_id in self._waiters:
                self._resolve(msg_id, msg)
            elif t == "error" and msg_id in self._waiters:
                self._resolve(msg_id, msg)
            else:
                await queue.put(msg)
            return
        if t in REPLY_TYPES and msg_id in self._waiters:
            self._resolve(msg_id, msg)
            return
        if self.on_event:
            self.on_event(msg)

    def _resolve(self, msg_id: int, msg: dict) -> None:
        fut = self._waiters.pop(msg_id, None)
        if fut and not fut.done():
            fut.set_result(msg)

    def _fail_all(self, exc: Exception) -> None:
        for fut in self._waiters.values():
            if not fut.done():
                fut.set_exception(exc)
        self._waiters.clear()
        for queue in self._exec_queues.values():
            try:
                queue.put_nowait({"t": "closed"})
            except asyncio.QueueFull:
                pass

    # --- requests ----------------------------------------------------------------------------

    async def send(self, msg: dict) -> None:
        if self.closed.is_set():
            raise VMError("control connection closed")
        async with self._write_lock:
            self.writer.write(protocol.encode(msg))
            await self.writer.drain()

    async def request(self, msg: dict, timeout: float = 60.0) -> dict:
        msg_id = next(self._ids)
        msg = {**msg, "id": msg_id}
        fut = asyncio.get_running_loop().create_future()
        self._waiters[msg_id] = fut
        try:
            await self.send(msg)
            reply = await asyncio.wait_for(fut, timeout)
        finally:
            self._waiters.pop(msg_id, None)
        if reply.get("t") == "error":
            raise RemoteError(str(reply.get("code")), str(reply.get("message")))
        return reply

    async def ping(self, timeout: float = 10.0) -> None:
        await self.request({"t": "ping"}, timeout)

    async def mount(self, tag: str, path: str, readonly: bool, wait: int = 0) -> None:
        """wait: seconds the agent waits for a hot-plugged device with this tag to show up."""
        await self.request({"t": "mount", "tag": tag, "path": path, "readonly": readonly, "wait": wait},
                           timeout=60.0 + wait)

    async def shutdown(self) -> None:
        await self.request({"t": "shutdown"}, timeout=10)

    async def exec(self, argv: list[str], *, cwd: str | None = None, env: dict | None = None,
                   stdin: bool = False, pty: bool = False, rows: int | None = None,
                   cols: int | None = None) -> "RemoteProcess":
        msg_id = next(self._ids)
        msg = {"t": "exec", "id": msg_id, "argv": argv, "stdin": stdin, "pty": pty}
        if cwd is not None:
            msg["cwd"] = cwd
        if env:
            msg["env"] = env
        if rows and cols:
            msg["rows"], msg["cols"] = rows, cols
        queue: asyncio.Queue = asyncio.Queue(EXEC_QUEUE)
        self._exec_queues[msg_id] = queue
        fut = asyncio.get_running_loop().create_future()
        self._waiters[msg_id] = fut
        try:
            await self.send(msg)
            reply = await asyncio.wait_for(fut, 60)
        except BaseException:
            self._exec_queues.pop(msg_id, None)
            self._waiters.pop(msg_id, None)
            raise
        if reply.get("t") == "error":
            self._exec_queues.pop(msg_id, None)
            raise RemoteError(str(reply.get("code")), str(reply.get("message")))
        return RemoteProcess(self, msg_id, int(reply.get("pid", 0)), queue)


class RemoteProcess:
    """A process running in the guest, started by `ControlConnection.exec`."""

    def __init__(self, conn: ControlConnection, exec_id: int, pid: int, queue: asyncio.Queue):
        self.conn = conn
        self.id = exec_id
        self.pid = pid
        self._queue = queue
        self.result: ExecResult | None = None

    async def output(self) -> AsyncIterator[tuple[int, bytes]]:
        """Yield (fd, data) until the process exits; then `result` is set."""
        while self.result is None:
            msg = await self._queue.get()
            t = msg["t"]
            if t == "out":
                fd = msg.get("fd")
                data = protocol.req_data(msg)
                yield (2 if fd == 2 else 1), data
            elif t == "exit":
                code = msg.get("code")
                sig = msg.get("signal")
                self.result = ExecResult(code if isinstance(code, int) else 255,
                                         sig if isinstance(sig, int) and sig > 0 else None)
                self.conn._exec_queues.pop(self.id, None)
            elif t == "error":
                raise RemoteError(str(msg.get("code")), str(msg.get("message")))
            elif t == "closed":
                raise VMError("the VM went away while the command was running")

    async def wait(self) -> ExecResult:
        async for _ in self.output():
            pass
        return self.result

    async def write_stdin(self, data: bytes) -> None:
        await self.conn.send({"t": "stdin", "id": self.id, "data": protocol.b64(data)})

    async def close_stdin(self) -> None:
        await self.conn.send({"t": "stdin", "id": self.id, "eof": True})

    async def resize(self, rows: int, cols: int) -> None:
        await self.conn.send({"t": "resize", "id": self.id, "rows": rows, "cols": cols})

    async def signal(self, signum: int) -> None:
        await self.conn.request({"t": "signal", "target": self.id, "signum": signum}, timeout=10)
