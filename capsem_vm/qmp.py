"""A minimal async QMP client (JSON lines over QEMU's -qmp Unix socket) for runtime changes to a
running VM, e.g. VirtioFS hotplug. QEMU is the peer: lines are bounded, every wait is timed out."""

from __future__ import annotations

import asyncio
import json

from .errors import VMError

MAX_LINE = 1 << 20


class QMP:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader, self.writer = reader, writer

    @classmethod
    async def connect(cls, path: str, timeout: float = 10.0) -> "QMP":
        reader, writer = await asyncio.wait_for(asyncio.open_unix_connection(path, limit=MAX_LINE), timeout)
        qmp = cls(reader, writer)
        try:
            greeting = await qmp._read(timeout)
            if "QMP" not in greeting:
                raise VMError(f"QEMU's QMP greeting is unexpected: {str(greeting)[:200]}")
            await qmp.execute("qmp_capabilities", timeout=timeout)
        except BaseException:
            writer.close()
            raise
        return qmp

    async def _read(self, timeout: float) -> dict:
        line = await asyncio.wait_for(self.reader.readline(), timeout)
        if not line:
            raise VMError("QEMU closed its QMP socket")
        try:
            msg = json.loads(line)
        except ValueError:
            raise VMError(f"QEMU sent a line that is not JSON: {line[:200]!r}") from None
        if not isinstance(msg, dict):
            raise VMError("QEMU sent a QMP message that is not an object")
        return msg

    async def execute(self, command: str, arguments: dict | None = None, timeout: float = 30.0) -> dict:
        msg = {"execute": command}
        if arguments:
            msg["arguments"] = arguments
        self.writer.write(json.dumps(msg).encode() + b"\n")
        await self.writer.drain()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            reply = await self._read(max(0.1, deadline - loop.time()))
            if "event" in reply:
                continue
            if "error" in reply:
                err = reply["error"]
                raise VMError(f"QMP {command} failed: {err.get('desc', err) if isinstance(err, dict) else err}")
            if "return" in reply:
                return reply["return"]

    def close(self) -> None:
        self.writer.close()
