"""Credential injection: host secrets go into requests to the hosts they belong to (HTTPS/WSS only).

The guest holds a placeholder. On an allowed request to a credential's host the placeholder is
replaced in header values and the query string, and the declared header (if any) is set. The
response is scrubbed (headers, and the streamed body) so an upstream that echoes the secret does
not hand it to the guest; Accept-Encoding is dropped on such requests so bodies stay scrubbable.
The secret value is never logged or audited.
"""

from __future__ import annotations

import logging

from mitmproxy import http

from ..scrub import Scrubber  # noqa: F401  (re-exported for streams)
from .guard import meta
from .state import State

log = logging.getLogger("capsem.credentials")


class Credentials:
    def __init__(self, state: State):
        self.state = state

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        m = meta(flow)
        d = m.get("decision")
        if d is None or not d.allowed or flow.response is not None:
            return
        if not m.get("url", "").startswith(("https://", "wss://")):
            return  # never put a secret on a plaintext wire
        sess = self.state.session(flow.client_conn)
        pairs = []
        for cred in sess.kernel.policy.credentials_for(sess.host):
            value = cred.value()
            if value is None:
                log.warning("credential %r for %s is not available on the host (env %s / file %s)",
                            cred.name, sess.host, cred.env, cred.file)
                continue
            req = flow.request
            ph, secret = cred.placeholder.encode(), value.encode()
            req.headers.fields = tuple((k, v.replace(ph, secret)) for k, v in req.headers.fields)
            if cred.placeholder in req.path:
                req.path = req.path.replace(cred.placeholder, value)
            if cred.header:
                req.headers[cred.header] = cred.format.replace("{value}", value)
            pairs.append((value.encode(), cred.placeholder.encode()))
        if pairs:
            flow.request.headers.pop("accept-encoding", None)
            m["secrets"] = pairs
            m["credentials"] = True

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        pairs = meta(flow).get("secrets")
        if not pairs or flow.response is None:
            return
        fields = []
        for k, v in flow.response.headers.fields:
            for secret, placeholder in pairs:
                v = v.replace(secret, placeholder)
            fields.append((k, v))
        flow.response.headers.fields = tuple(fields)
