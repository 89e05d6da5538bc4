"""Shared state of the proxy service's addons: registered kernels, per-connection sessions and
per-flow facts.

A session is one authenticated SOCKS5 connection from a bridge, i.e. one guest TCP connection.
It carries who (kernel) and where (the destination the guest asked for, before resolution).
A FlowMeta is what the addons know about one flow (HTTP exchange, WebSocket or raw TCP stream):
Guard writes the decision, Credentials the secrets, Streams the byte counts, Audit reads it all
for the flow's row (`flow_meta(flow)`).
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


@dataclass
class FlowMeta:
    """What capsem's addons know about one flow; kept in `flow.metadata[FLOW_META_KEY]`."""
    started: float | None = None       # wall time the flow was first seen (Guard)
    kernel: str | None = None          # kernel id of the session
    host: str | None = None            # the judged destination: name or IP literal
    port: int | None = None            # the judged destination port
    kind: str = "http"                 # http | websocket | tcp: the audit row's kind
    url: str = ""                      # scheme://host:port/path the guest asked for (placeholders)
    decision: Decision | None = None   # the verdict (Guard; Credentials or Audit may replace a yes)
    detail: str = ""                   # why a denial, beyond the decision's reason
    killed: str = ""                   # how a refusal ended when it was not a 403
    secrets: list[tuple[bytes, bytes]] = field(default_factory=list)  # (secret, placeholder) injected
    credentials: bool = False          # a credential was injected (the audit row says so)
    bytes_out: int | None = None       # guest -> upstream body / stream bytes (None: nothing counted)
    bytes_in: int | None = None        # upstream -> guest
    ws_out: int = 0                    # WebSocket message bytes, guest -> upstream
    ws_in: int = 0                     # WebSocket message bytes, upstream -> guest
    audited: bool = False              # the flow's row is written (once per flow)
    limits_done: bool = False          # Limits counted the flow's end (once per flow)


FLOW_META_KEY = "capsem"


def flow_meta(flow) -> FlowMeta:
    """The flow's FlowMeta, created on first use."""
    m = flow.metadata.get(FLOW_META_KEY)
    if m is None:
        m = flow.metadata[FLOW_META_KEY] = FlowMeta()
    return m


class State:
    def __init__(self, resolve: dict[str, str] | None = None):
        self.kernels: dict[str, Kernel] = {}
        self.sessions: dict[str, Session] = {}   # client connection id -> session
        self.resolve = {k.lower().rstrip("."): v for k, v in (resolve or {}).items()}
        self.audit = None  # the Audit addon, for events outside any flow

    def session(self, client) -> Session | None:
        return self.sessions.get(client.id)
