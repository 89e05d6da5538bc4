"""Speed settings of the proxy service process (imports mitmproxy: service side only).

Each one removes per-request work that buys nothing here; none changes what is allowed, injected
or audited. Measured with bench/proxy.py.
"""

from __future__ import annotations

import asyncio


def skip_message_typecheck() -> None:
    """mitmproxy type-checks every field of every Request/Response it builds (its own `if __debug__`
    aid, ~5% of the service's CPU per request). Our messages come from mitmproxy's own parsers."""
    from mitmproxy import http
    http.MessageData.__post_init__ = lambda self: None


def event_loop_runner():
    """`asyncio.run` or, if installed in the proxy venv, uvloop's (C event loop and transports)."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run
    return uvloop.run
