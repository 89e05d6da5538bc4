"""Speed settings of the proxy service process (service side only).

Each one removes per-request work that buys nothing here; none changes what is allowed, injected
or audited. Measured with bench/proxy.py. (Speed patches of mitmproxy internals live in
mitm_patches.py, behind its version gate.)
"""

from __future__ import annotations

import asyncio
import gc
import re
import sys


def event_loop_runner():
    """`asyncio.run` or, if installed in the proxy venv and usable there, uvloop's (C event loop
    and transports)."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run
    if not uvloop_usable(sys.version_info[:2], getattr(uvloop, "__version__", "0")):
        return asyncio.run
    return uvloop.run


def uvloop_usable(python: tuple[int, int], uvloop_version: str) -> bool:
    """False where uvloop would break mitmproxy: on Python 3.12 and 3.13 mitmproxy (11.0.2 and 12.x
    alike: Master.run, asyncio_utils.set_eager_task_factory) installs asyncio.eager_task_factory, and uvloop from 0.22 calls the task factory with eager_start=,
    which those Pythons' factory does not take ("unexpected keyword argument 'eager_start'": the
    proxy never starts; found running the suite on Debian 13's Python 3.13)."""
    if not (3, 12) <= python < (3, 14):
        return True
    m = re.match(r"(\d+)\.(\d+)", uvloop_version)
    return m is not None and (int(m.group(1)), int(m.group(2))) < (0, 22)  # unknown: not usable


# young-generation threshold of the collector while the service runs (CPython's default is 700)
GC_THRESHOLD0 = 20_000


def quiet_gc() -> None:
    """Call once the service is set up. Everything allocated so far (mitmproxy, cryptography, the
    addons, the policy) lives as long as the process: gc.freeze() keeps the collector from walking it
    on every older-generation pass, and a larger young threshold runs the young passes less often
    (mitmproxy allocates tens of objects per request, some in cycles). Measured with bench/proxy.py:
    the collector was ~6% of a worker's CPU per request (py-spy). Memory stays bounded: cyclic
    garbage waits at most GC_THRESHOLD0 allocations, not forever. No gc.collect() first: at that
    point it found nothing to free and cost 30-240 ms of every worker's (re)start."""
    gc.freeze()
    _, t1, t2 = gc.get_threshold()
    gc.set_threshold(GC_THRESHOLD0, t1, t2)
