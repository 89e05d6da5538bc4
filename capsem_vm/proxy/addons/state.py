"""Shared state of the proxy service's addons: registered kernels and per-connection sessions.

A session is one authenticated SOCKS5 connection from a bridge, i.e. one guest TCP connection.
It carries who (kernel) and where (the destination the guest asked for, before resolution).
"""

from __future__ import annotations

import hmac
import time
from dataclasses import dataclass, field

from ...policy import Decision, Policy


@dataclass
class Kernel:
    id: str
    password: str = field(repr=False)
    policy: Policy

    def check(self, password: str) -> bool:
        return hmac.compare_digest(self.password.encode(), password.encode())


@dataclass
class Session:
    kernel: Kernel
    started: float = field(default_factory=time.time)
    host: str | None = None            # normalized destination (name or IP literal)
    port: int | None = None
    pinned: str | None = None          # the resolved address we connected to
    connect_decision: Decision | None = None
    mismatch: str | None = None        # SNI differs from the destination: every request is denied
    requests: int = 0
    inflight: int = 0
    deadline: float | None = None      # loop time by which request headers must be complete


class State:
    def __init__(self, resolve: dict[str, str] | None = None):
        self.kernels: dict[str, Kernel] = {}
        self.sessions: dict[str, Session] = {}   # client connection id -> session
        self.resolve = {k.lower().rstrip("."): v for k, v in (resolve or {}).items()}
        self.audit = None  # the Audit addon, for events outside any flow

    def session(self, client) -> Session | None:
        return self.sessions.get(client.id)
