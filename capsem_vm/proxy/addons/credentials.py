"""Credential injection: host secrets go into requests to the hosts they belong to (HTTPS/WSS only),
and only into the place each credential declares (capsem_vm/proxy/placement.py): its `header`, set
to `format` with the value, and/or its `query` parameter when the guest sent the placeholder as
that parameter's value. A placeholder anywhere else (other headers, cookies, the path, other
parameters, the body) goes out as the guest wrote it: the guest never chooses where a secret lands.

A credential that applies but cannot be read (env unset; file missing, a symlink, or writable by
others: checked on every read) refuses the request (403, code "credential"), never sends it
without. The response is scrubbed (headers, and the streamed body) so an upstream that echoes the
secret does not hand it to the guest; Accept-Encoding is dropped on such requests so bodies stay
scrubbable. The secret value is never logged or audited.

Observe mode: a request (or its connection) that passes only as would-deny gets no credential:
the policy would refuse it, so no secret goes with it.
"""

from __future__ import annotations

import logging

from mitmproxy import http

from ...policy import DENY, Decision
from ..placement import place_in_query, query_value
from ..scrub import Scrubber  # noqa: F401  (re-exported for streams)
from .guard import refuse_request
from .state import State, flow_meta

log = logging.getLogger("capsem.credentials")


class Credentials:
    def __init__(self, state: State):
        self.state = state

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        m = flow_meta(flow)
        d = m.decision
        sess = self.state.session(flow.client_conn)
        # only where the policy itself says yes, for the request and its connection: a would-deny
        # (observe mode) goes out as the guest wrote it, placeholders and all
        if d is None or not d.allowed or flow.response is not None:
            return
        if sess is None or sess.connect_decision is None or not sess.connect_decision.allowed:
            return
        if not m.url.startswith(("https://", "wss://")):
            return  # never put a secret on a plaintext wire
        req = flow.request
        pairs = []
        for cred in sess.kernel.policy.credentials_for(sess.host):
            value, why = cred.read()
            if value is None:
                log.warning("credential %r for %s cannot be used: %s", cred.name, sess.host, why)
                self._refuse(flow, Decision(DENY, "credential", f"credential {cred.name!r} cannot be used: {why}"))
                return
            if cred.header:
                req.headers[cred.header] = cred.format.replace("{value}", value)
            pairs.append((value.encode(), cred.placeholder.encode()))
            if cred.query:
                encoded = query_value(value)
                req.data.path, _ = place_in_query(req.data.path, cred.query.encode(),
                                                  cred.placeholder.encode(), encoded)
                if encoded != value.encode():
                    pairs.append((encoded, cred.placeholder.encode()))
        if pairs:
            req.headers.pop("accept-encoding", None)
            m.secrets = pairs
            m.credentials = True

    @staticmethod
    def _refuse(flow: http.HTTPFlow, d: Decision) -> None:
        flow.request.stream = False  # the guard streamed allowed uploads; a refused one is never sent
        refuse_request(flow, d, "", "refused")

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        pairs = flow_meta(flow).secrets
        if not pairs or flow.response is None:
            return
        fields = []
        for k, v in flow.response.headers.fields:
            for secret, placeholder in pairs:
                v = v.replace(secret, placeholder)
            fields.append((k, v))
        flow.response.headers.fields = tuple(fields)
