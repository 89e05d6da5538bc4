"""`Sandbox.commands.run`: shell commands in the sandbox's VM, beside its kernel.

They go through the guest agent's exec (capsem_vm/control.py), never a host shell: `/bin/sh -c`
runs in the guest, with the guest's clean environment (plus the egress variables, so its traffic
takes the policy proxy and is audited under the kernel's id like the kernel's own), in the shared
folder by default. The exec runs on the capsem loop thread (where the VM lives); output comes back
to the caller's thread through a queue, so callbacks never run on (and never block) that loop.
Output is bounded (execution.MAX_OUTPUT_BYTES per command; the rest is dropped and counted).
"""

from __future__ import annotations

import asyncio
import codecs
import queue
import signal
import time
from dataclasses import dataclass

from .execution import MAX_OUTPUT_BYTES, OutputMessage

KILL_WAIT = 10.0  # after a timeout's SIGKILL, how long the exit may take to come back
TIMEOUT_EXIT = 124  # exit code of a command stopped for its timeout (as timeout(1) reports it)
_DONE = object()


@dataclass
class CommandResult:
    exit_code: int
    stdout: str
    stderr: str
    error: str | None = None  # why the command did not finish by itself (timeout), E2B's field
    dropped_bytes: int = 0


class Commands:
    def __init__(self, sandbox):
        self._sandbox = sandbox

    def run(self, cmd: str, cwd: str | None = None, env: dict[str, str] | None = None,
            timeout: float | None = None, on_stdout=None, on_stderr=None) -> CommandResult:
        """Run `cmd` with /bin/sh -c in the guest; cwd defaults to the sandbox folder. On timeout
        the command's process group is killed and exit_code is 124."""
        from . import loop_thread
        sandbox = self._sandbox
        control = sandbox._control()
        timeout = sandbox.timeout if timeout is None else timeout
        chunks: queue.Queue = queue.Queue()
        future = asyncio.run_coroutine_threadsafe(
            _exec(control, ["/bin/sh", "-c", cmd], cwd or str(sandbox.folder), dict(env or {}), timeout, chunks),
            loop_thread.get_loop())
        out: dict[int, list[str]] = {1: [], 2: []}
        while (item := chunks.get()) is not _DONE:
            fd, text = item
            out[fd].append(text)
            callback = on_stderr if fd == 2 else on_stdout
            if callback is not None:
                callback(OutputMessage(text, time.time(), error=fd == 2))
        exit_code, error, dropped = future.result()
        return CommandResult(exit_code, "".join(out[1]), "".join(out[2]), error, dropped)


async def _exec(control, argv: list[str], cwd: str, env: dict, timeout: float | None,
                chunks: queue.Queue) -> tuple[int, str | None, int]:
    """On the capsem loop: run, pass decoded output to `chunks`, end with _DONE (always)."""
    decoders = {1: codecs.getincrementaldecoder("utf-8")("replace"),
                2: codecs.getincrementaldecoder("utf-8")("replace")}
    budget = MAX_OUTPUT_BYTES
    dropped = 0

    async def pump(proc) -> None:
        nonlocal budget, dropped
        async for fd, data in proc.output():
            if len(data) > budget:
                dropped += len(data)
                continue
            budget -= len(data)
            text = decoders[fd].decode(data)
            if text:
                chunks.put((fd, text))

    try:
        proc = await control.exec(argv, cwd=cwd, env=env or None)
        error = None
        try:
            await asyncio.wait_for(pump(proc), timeout)
        except asyncio.TimeoutError:
            error = f"the command timed out after {timeout:g} s and was killed"
            await proc.signal(signal.SIGKILL)
            await asyncio.wait_for(pump(proc), KILL_WAIT)
        for fd, decoder in decoders.items():
            if tail := decoder.decode(b"", final=True):
                chunks.put((fd, tail))
        code = proc.result.shell_code if proc.result is not None else 255
        return (TIMEOUT_EXIT if error else code), error, dropped
    finally:
        chunks.put(_DONE)
