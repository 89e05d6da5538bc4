"""A process-wide event loop on its own thread, where every capsem VM of this process lives.

Jupyter front ends drive provisioners from different loops: jupyter_server's main loop, or a
loop that only runs while a blocking KernelManager call is in progress (jupyter_console,
jupyter_kernel_test). The channel relay must keep running between those calls, so VMs and relays
run here, and provisioner methods hand coroutines over with `run()`.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")

# Process-wide by necessity (exempt from "owned state"): jupyter_client makes provisioners from an
# entry point and drives them from whatever loop or thread it has, so nothing can hand them a loop;
# every VM of the process, its relays and the process EgressRuntime live on this one.
_lock = threading.Lock()
_loop: asyncio.AbstractEventLoop | None = None


def get_loop() -> asyncio.AbstractEventLoop:
    global _loop
    with _lock:
        if _loop is None or _loop.is_closed():
            ready = threading.Event()
            loop = asyncio.new_event_loop()

            def run():
                asyncio.set_event_loop(loop)
                ready.set()
                loop.run_forever()

            threading.Thread(target=run, name="capsem-vm-loop", daemon=True).start()
            ready.wait()
            _loop = loop
        return _loop


async def run(coro: Coroutine[Any, Any, T]) -> T:
    """Run `coro` on the capsem loop and await its result from the caller's loop."""
    loop = get_loop()
    try:
        current = asyncio.get_running_loop()
    except RuntimeError:
        current = None
    if current is loop:
        return await coro
    return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, loop))


def run_sync(coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
    """Blocking variant for non-async callers (atexit, tests)."""
    return asyncio.run_coroutine_threadsafe(coro, get_loop()).result(timeout)
