"""Speed settings of the proxy service process (service side only).

Each one removes per-request work that buys nothing here; none changes what is allowed, injected
or audited. Measured with bench/proxy.py. (Speed patches of mitmproxy internals live in
mitm_patches.py, behind its version gate.)
"""

from __future__ import annotations

import asyncio


def event_loop_runner():
    """`asyncio.run` or, if installed in the proxy venv, uvloop's (C event loop and transports)."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run
    return uvloop.run
