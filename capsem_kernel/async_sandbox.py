"""AsyncSandbox: the Sandbox API for asyncio agents (E2B's `AsyncSandbox` shape).

    sb = await AsyncSandbox.create(policy="policy.toml")
    async with sb:
        ex = await sb.run_code("1 + 1")
        r = await sb.commands.run("ls")

Each call runs the blocking Sandbox method on a worker thread (asyncio.to_thread), so every
guarantee and every line of the kernel's handling stays in sandbox.py; the caller's loop never
blocks. on_stdout/on_stderr/on_result/on_error callbacks run on the caller's loop (plain functions
are called there, coroutine functions scheduled as tasks), not on the worker thread. A cancelled
run_code interrupts the kernel.
"""

from __future__ import annotations

import asyncio
import inspect

from .commands import CommandResult
from .execution import Execution
from .sandbox import Sandbox


def _on_loop(loop: asyncio.AbstractEventLoop, callback):
    """`callback` (called from the worker thread) run on `loop` instead."""
    if callback is None:
        return None

    def call(arg):
        if inspect.iscoroutinefunction(callback):
            loop.call_soon_threadsafe(lambda: loop.create_task(callback(arg)))
        else:
            loop.call_soon_threadsafe(callback, arg)
    return call


class AsyncCommands:
    def __init__(self, sandbox: Sandbox):
        self._sandbox = sandbox

    async def run(self, cmd: str, cwd: str | None = None, env: dict[str, str] | None = None,
                  timeout: float | None = None, on_stdout=None, on_stderr=None) -> CommandResult:
        loop = asyncio.get_running_loop()
        return await asyncio.to_thread(self._sandbox.commands.run, cmd, cwd, env, timeout,
                                       _on_loop(loop, on_stdout), _on_loop(loop, on_stderr))


class AsyncSandbox:
    """Build with `await AsyncSandbox.create(...)` (Sandbox's arguments)."""

    def __init__(self, sandbox: Sandbox):
        self._sandbox = sandbox
        self.commands = AsyncCommands(sandbox)

    @classmethod
    async def create(cls, folder=None, policy=None, **kw) -> "AsyncSandbox":
        return cls(await asyncio.to_thread(Sandbox, folder, policy, **kw))

    async def __aenter__(self) -> "AsyncSandbox":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    @property
    def sandbox(self) -> Sandbox:
        """The blocking Sandbox underneath (folder, kernel_id, timeout, interrupt_grace)."""
        return self._sandbox

    @property
    def folder(self):
        return self._sandbox.folder

    @property
    def kernel_id(self) -> str:
        return self._sandbox.kernel_id

    async def run_code(self, code: str, timeout: float | None = None, on_stdout=None, on_stderr=None,
                       on_result=None, on_error=None) -> Execution:
        loop = asyncio.get_running_loop()
        task = asyncio.ensure_future(asyncio.to_thread(
            self._sandbox.run_code, code, timeout, _on_loop(loop, on_stdout), _on_loop(loop, on_stderr),
            _on_loop(loop, on_result), _on_loop(loop, on_error)))
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            # the worker thread cannot be cancelled: stop the cell, so the thread returns
            await asyncio.to_thread(self._sandbox.interrupt)
            raise

    async def network_log(self, after_id: int = 0) -> list[dict]:
        return await asyncio.to_thread(self._sandbox.network_log, after_id)

    async def interrupt(self) -> None:
        await asyncio.to_thread(self._sandbox.interrupt)

    async def restart(self) -> None:
        await asyncio.to_thread(self._sandbox.restart)

    async def is_alive(self) -> bool:
        return await asyncio.to_thread(self._sandbox.is_alive)

    async def info(self) -> dict:
        return await asyncio.to_thread(self._sandbox.info)

    async def close(self) -> None:
        await asyncio.to_thread(self._sandbox.close)
