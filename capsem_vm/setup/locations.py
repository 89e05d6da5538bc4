"""Where root's `capsem setup` puts what it shares with every user (CAPSEM_SYSTEM_PREFIX moves it:
for tests, and hosts that keep /opt elsewhere). Read by the proxy service's env lookup too."""

from __future__ import annotations

import os

SYSTEM_PREFIX = "/opt/capsem"


def system_prefix() -> str:
    return os.environ.get("CAPSEM_SYSTEM_PREFIX") or SYSTEM_PREFIX


def system_proxy_env() -> str:
    """The proxy env root made for every user (the proxy service looks here: proxy/service.py)."""
    return f"{system_prefix()}/proxy-venv"
