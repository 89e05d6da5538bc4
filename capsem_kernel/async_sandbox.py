"""AsyncSandbox: the Sandbox API for asyncio agents (E2B's `AsyncSandbox` shape).

    sb = await AsyncSandbox.create(policy="policy.toml")
    async with sb:
        ex = await sb.run_code("1 + 1")
        r = await sb.commands.run("ls")

Each call runs the blocking Sandbox method on this sandbox's own worker thread, so every
guarantee and every line of the kernel's handling stays in sandbox.py; the caller's loop never
blocks. Why a thread of its own, not asyncio.to_thread: jupyter_client's blocking calls run on the
event loop that jupyter_core keeps in a ContextVar; to_thread copies the caller's context into the
worker, so two sandboxes' workers could share (and both try to run) one loop ("This event loop is
already running", seen in CI after a blocking Sandbox had run in the same process). A thread's own
context keeps one loop per sandbox; interrupts get a second thread, as they arrive while a cell runs. on_stdout/on_stderr/on_result/on_error callbacks run on the caller's loop (plain functions
are called there, coroutine functions scheduled as tasks), not on the worker thread. A cancelled
run_code interrupts the kernel.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
from concurrent.futures import ThreadPoolExecutor

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


async def _on(worker: ThreadPoolExecutor, fn, *args):
    """`fn(*args)` on `worker`, in that thread's own context (see the module docstring)."""
    return await asyncio.get_running_loop().run_in_executor(worker, functools.partial(fn, *args))


def _worker(name: str) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"capsem-sandbox-{name}")


class AsyncCommands:
    def __init__(self, sandbox: Sandbox, worker: ThreadPoolExecutor):
        self._sandbox = sandbox
        self._worker = worker

    async def run(self, cmd: str, cwd: str | None = None, env: dict[str, str] | None = None,
                  timeout: float | None = None, on_stdout=None, on_stderr=None) -> CommandResult:
        loop = asyncio.get_running_loop()
        return await _on(self._worker, self._sandbox.commands.run, cmd, cwd, env, timeout,
                         _on_loop(loop, on_stdout), _on_loop(loop, on_stderr))


class AsyncFiles:
    """Sandbox.files (files.py) for asyncio: the same methods, awaited."""

    METHODS = ("read", "write", "list", "exists", "get_info", "make_dir", "remove", "upload_dir",
               "download_dir")

    def __init__(self, sandbox: Sandbox, worker: ThreadPoolExecutor):
        self._sandbox = sandbox
        self._worker = worker

    def __getattr__(self, name: str):
        if name not in self.METHODS:
            raise AttributeError(name)
        method = getattr(self._sandbox.files, name)

        async def call(*args, **kw):
            return await _on(self._worker, functools.partial(method, *args, **kw))
        call.__doc__ = method.__doc__
        return call


class AsyncSandbox:
    """Build with `await AsyncSandbox.create(...)` (Sandbox's arguments)."""

    def __init__(self, sandbox: Sandbox, worker: ThreadPoolExecutor | None = None):
        self._sandbox = sandbox
        self._worker = worker or _worker("calls")
        self._interrupter = _worker("interrupt")
        self.commands = AsyncCommands(sandbox, self._worker)
        self.files = AsyncFiles(sandbox, self._worker)

    @classmethod
    async def create(cls, folder=None, policy=None, **kw) -> "AsyncSandbox":
        worker = _worker("calls")
        try:
            sandbox = await _on(worker, functools.partial(Sandbox, folder, policy, **kw))
        except BaseException:
            worker.shutdown(wait=False)
            raise
        return cls(sandbox, worker)

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
        task = asyncio.ensure_future(_on(
            self._worker, self._sandbox.run_code, code, timeout, _on_loop(loop, on_stdout),
            _on_loop(loop, on_stderr), _on_loop(loop, on_result), _on_loop(loop, on_error)))
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            # the worker thread cannot be cancelled: stop the cell, so the thread returns
            await _on(self._interrupter, self._sandbox.interrupt)
            raise

    async def network_log(self, after_id: int = 0) -> list[dict]:
        return await _on(self._worker, self._sandbox.network_log, after_id)

    async def interrupt(self) -> None:
        await _on(self._interrupter, self._sandbox.interrupt)

    async def restart(self) -> None:
        await _on(self._worker, self._sandbox.restart)

    async def is_alive(self) -> bool:
        return await _on(self._interrupter, self._sandbox.is_alive)

    async def info(self) -> dict:
        return await _on(self._interrupter, self._sandbox.info)

    async def close(self) -> None:
        try:
            await _on(self._worker, self._sandbox.close)
        finally:
            self._worker.shutdown(wait=False)
            self._interrupter.shutdown(wait=False)
