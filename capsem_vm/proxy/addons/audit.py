"""Audit addon: one row per connection decision, HTTP exchange, WebSocket and raw TCP stream.

URLs are those the guest sent (placeholders, never injected secrets), then redacted
(capsem_vm.proxy.audit.redact_url). Every row carries a stable code (Decision.code).

It is also the gate of "refused, never unaudited": it runs after Guard, and while the audit log
cannot be written (AuditLog.available is False) it refuses what Guard let pass (allowed, or
would-deny in observe mode): new upstream connections, requests (403) and raw TCP streams, with
code "audit-unavailable"."""

from __future__ import annotations

import logging
import time

from mitmproxy import http

from ... import safetext
from ...policy import DENY, Decision
from ...rate import Throttle
from ..audit import AuditLog, redact_url
from .guard import _deny_response
from .state import flow_meta

log = logging.getLogger("capsem.proxy")

UNAVAILABLE = Decision(DENY, "audit-unavailable",
                       "the audit log cannot be written: egress is refused rather than unaudited",
                       code="audit-unavailable")


class Audit:
    def __init__(self, log: AuditLog, state=None):
        self.log = log
        self.state = state  # the service's State, to name the session of a refused connection
        self._refused = Throttle(1.0)  # refusals for audit-unavailable: one log line a second

    # called by Guard for connection-level decisions
    def connection(self, sess, target: str, d: Decision, reason: str | None, decision: str | None = None) -> None:
        self.log.record(sess.kernel.id, "connect", url=target, host=sess.host, port=sess.port,
                        decision=decision or d.action, rule=d.rule, code=d.code, reason=reason or d.reason)

    def timeout(self, sess, seconds: float) -> None:
        self.log.record(sess.kernel.id, "connect", url=f"{sess.host}:{sess.port}", host=sess.host, port=sess.port,
                        decision="deny", rule="header-timeout", code="header-timeout",
                        reason=f"closed: request headers not complete within {seconds:g} s")

    def header_size(self, sess, limit: int) -> None:
        self.log.record(sess.kernel.id, "connect", url=f"{sess.host}:{sess.port}", host=sess.host, port=sess.port,
                        decision="deny", rule="header-size", code="header-size", status=431,
                        reason=f"closed: request headers larger than {limit} bytes")

    # --- the gate: refused while the audit log cannot be written -------------------------------

    def _unavailable(self, what: str) -> bool:
        if self.log.available:
            return False
        if n := self._refused.count(time.monotonic()):  # bounded: one line a second whatever the guest does
            log.error("refused %d %s(s): the audit log cannot be written (%s)", n, what,
                      safetext.escape(self.log.last_error or "?"))
        return True

    def server_connect(self, data) -> None:
        if data.server.error is None and self._unavailable("connection"):
            data.server.error = "capsem: the audit log cannot be written"
            sess = self.state.session(data.client) if self.state is not None else None
            if sess is not None:  # held in memory (bounded, counted) until the database works again
                self.connection(sess, f"{sess.host}:{sess.port}", UNAVAILABLE, None)

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        m = flow_meta(flow)
        d = m.decision
        if d is not None and d.passes and flow.response is None and self._unavailable("request"):
            m.decision = UNAVAILABLE
            flow.response = _deny_response(UNAVAILABLE)

    def tcp_start(self, flow) -> None:
        m = flow_meta(flow)
        d = m.decision
        if d is not None and d.passes and self._unavailable("TCP stream"):
            m.decision = UNAVAILABLE
            flow.kill()

    def _row(self, flow, *, status=None, error: str | None = None) -> None:
        m = flow_meta(flow)
        if m.audited:
            return
        m.audited = True
        d = m.decision
        started = m.started or time.time()
        reason = d.reason if d else ""
        if m.detail:
            reason += f" ({m.detail})"
        if m.killed:
            reason += f"; {m.killed}"
        if error:
            reason += f"; error: {error}"
        secrets = [s.decode(errors="replace") for s, _ in m.secrets]
        # an allowed flow that failed is an "error" row; a would-deny keeps its decision and code
        failed = bool(error) and d is not None and d.allowed
        url = redact_url(m.url, secrets)
        self.log.record(
            m.kernel or "?", m.kind,
            ts=started, method=getattr(getattr(flow, "request", None), "method", None),
            url=url, host=m.host, port=m.port, status=status,
            bytes_out=m.bytes_out, bytes_in=m.bytes_in,
            duration_ms=round((time.time() - started) * 1000, 2),
            decision=("error" if failed else (d.action if d else "error")),
            code=("error" if failed else (d.code if d else "error")),
            rule=d.rule if d else "-", reason=reason[:2000] + (" [credential injected]" if m.credentials else ""))

    def response(self, flow: http.HTTPFlow) -> None:
        if flow.websocket is not None:
            return  # audited when the WebSocket ends
        self._row(flow, status=flow.response.status_code if flow.response else None)

    def error(self, flow: http.HTTPFlow) -> None:
        self._row(flow, status=flow.response.status_code if flow.response else None,
                  error=flow.error.msg if flow.error else "error")

    def websocket_end(self, flow: http.HTTPFlow) -> None:
        m = flow_meta(flow)
        m.bytes_out, m.bytes_in = m.ws_out, m.ws_in
        self._row(flow, status=101)

    def tcp_end(self, flow) -> None:
        self._row(flow)

    def tcp_error(self, flow) -> None:
        self._row(flow, error=flow.error.msg if flow.error else "error")
