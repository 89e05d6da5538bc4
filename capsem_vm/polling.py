"""Poll until something holds: the one loop for "check, sleep, re-check until a deadline".

The predicate is called first, so a condition that already holds costs no sleep, and once more
after the deadline has passed, so a slow last sleep does not turn a success into a timeout. It
returns the first truthy value it got (a socket, a status dict, True). To give up early (the
process being waited for died) the predicate raises; the exception passes through unchanged.
"""
from __future__ import annotations

import asyncio
import inspect
import math
import time
from typing import Awaitable, Callable, TypeVar, overload

T = TypeVar("T")


class PollTimeout(TimeoutError):
    """What was waited for did not happen in time. `what` names it, `timeout` is in seconds."""

    def __init__(self, message: str, what: str = "", timeout: float | None = None):
        super().__init__(message)
        self.what = what
        self.timeout = timeout


def timeout_message(what: str, timeout: float | None) -> str:
    return f"timed out after {timeout:g} s waiting for {what}"


def _expired(what: str, timeout: float | None, error: Callable[[str], BaseException] | None) -> BaseException:
    message = timeout_message(what, timeout)
    return error(message) if error is not None else PollTimeout(message, what, timeout)


def poll_until(predicate: Callable[[], T | None], *, what: str, timeout: float | None, interval: float,
               error: Callable[[str], BaseException] | None = None,
               clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], object] = time.sleep) -> T:
    """Call `predicate` every `interval` seconds until it returns a truthy value, and return it.
    After `timeout` seconds (None: no limit) raise `error(message)` (default PollTimeout), the
    message naming `what` ("timed out after 10 s waiting for <what>")."""
    deadline = clock() + (math.inf if timeout is None else timeout)
    while True:
        if result := predicate():
            return result
        if clock() > deadline:
            raise _expired(what, timeout, error)
        sleep(interval)


@overload
async def poll_until_async(predicate: Callable[[], Awaitable[T | None]], *, what: str, timeout: float | None,
                           interval: float, error: Callable[[str], BaseException] | None = None) -> T: ...
@overload
async def poll_until_async(predicate: Callable[[], T | None], *, what: str, timeout: float | None,
                           interval: float, error: Callable[[str], BaseException] | None = None) -> T: ...
async def poll_until_async(predicate, *, what, timeout, interval, error=None):
    """poll_until for the event loop: sleeps with asyncio.sleep, and the predicate may be a
    coroutine function (awaited each round). Timed by the running loop's clock."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + (math.inf if timeout is None else timeout)
    while True:
        result = predicate()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return result
        if loop.time() > deadline:
            raise _expired(what, timeout, error)
        await asyncio.sleep(interval)
