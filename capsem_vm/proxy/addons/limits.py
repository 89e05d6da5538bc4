"""Limits that keep a hostile guest from exhausting the host through the proxy.

- Header deadline (slow loris): a connection must deliver complete request headers within
  `capsem_header_timeout` seconds of opening, and again of each response. Otherwise it is closed.
  Raw TCP and WebSocket streams, once judged, fall back to the idle timeout instead.
- Header size: mitmproxy 11's HTTP/1 reader buffers request heads without bound; the service
  patches its reader (mitm_patches.patch_http1_header_limit, with this addon's limit and audit
  row) so a head larger than `capsem_max_header_bytes` gets 431 and the connection closes.
"""

from __future__ import annotations

import asyncio
import logging

from mitmproxy import ctx, http

from .state import State, flow_meta

log = logging.getLogger("capsem.limits")

MAX_HEADER_BYTES = 64 * 1024


class Limits:
    def __init__(self, state: State):
        self.state = state

    def load(self, loader):
        loader.add_option("capsem_header_timeout", float, 30.0,
                          "Seconds a connection may take to send complete request headers.")
        loader.add_option("capsem_max_header_bytes", int, MAX_HEADER_BYTES,
                          "Largest HTTP/1 request head accepted (431 above).")

    @staticmethod
    def max_header_bytes() -> int:
        return ctx.options.capsem_max_header_bytes

    def header_too_large(self, client) -> None:
        sess = self.state.session(client)
        if sess is not None and self.state.audit is not None:
            self.state.audit.header_size(sess, ctx.options.capsem_max_header_bytes)

    # deadline bookkeeping: a timestamp per session, checked by one sweep task per worker.
    # why not call_later per request: arming and cancelling a timer on every keep-alive request
    # was a few % of the worker's CPU per request; a sweep costs O(connections) a tick.

    def running(self) -> None:
        self._sweeper = asyncio.ensure_future(self._sweep())

    def done(self) -> None:
        sweeper = getattr(self, "_sweeper", None)
        if sweeper is not None:
            sweeper.cancel()

    async def _sweep(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(min(1.0, ctx.options.capsem_header_timeout / 4))
            now = loop.time()
            expired = [cid for cid, sess in self.state.sessions.items()
                       if sess.deadline is not None and sess.deadline <= now]
            for cid in expired:
                try:
                    self._expire(cid)
                except Exception:  # pragma: no cover - one bad connection must not stop the sweep
                    log.exception("closing connection %s after its header deadline failed", cid)

    def _arm(self, client) -> None:
        sess = self.state.session(client)
        if sess is not None:
            sess.deadline = asyncio.get_running_loop().time() + ctx.options.capsem_header_timeout

    def _disarm(self, client) -> None:
        sess = self.state.session(client)
        if sess is not None:
            sess.deadline = None

    def _expire(self, client_id: str) -> None:
        sess = self.state.sessions.get(client_id)
        if sess is not None:
            sess.deadline = None
        server = ctx.master.addons.get("proxyserver")
        handler = server.connections.get(client_id)
        if handler is None:
            return
        log.info("closing connection %s: request headers not complete in time", client_id)
        if sess is not None and self.state.audit is not None:
            self.state.audit.timeout(sess, ctx.options.capsem_header_timeout)
        handler.close_connection(handler.client)

    def server_connected(self, data) -> None:
        self._arm(data.client)  # starts once the destination is accepted

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        self._disarm(flow.client_conn)
        sess = self.state.session(flow.client_conn)
        if sess is not None:
            sess.inflight += 1

    def _done(self, flow: http.HTTPFlow) -> None:
        sess = self.state.session(flow.client_conn)
        m = flow_meta(flow)
        if sess is None or m.limits_done:
            return
        m.limits_done = True
        sess.inflight -= 1
        if sess.inflight == 0 and flow.websocket is None and m.kind != "websocket":
            self._arm(flow.client_conn)  # keep-alive: the next request gets a fresh deadline

    def response(self, flow: http.HTTPFlow) -> None:
        self._done(flow)

    def error(self, flow: http.HTTPFlow) -> None:
        self._done(flow)

    def tcp_start(self, flow) -> None:
        self._disarm(flow.client_conn)
