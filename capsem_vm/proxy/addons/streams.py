"""Bounded memory for every stream: response bodies are streamed (never buffered whole, counted,
scrubbed when a credential was injected) and WebSocket / raw TCP message lists, which mitmproxy
keeps on the flow, are counted then emptied."""

from __future__ import annotations

from mitmproxy import http

from ..scrub import Scrubber
from .state import flow_meta


class Streams:
    def responseheaders(self, flow: http.HTTPFlow) -> None:
        m = flow_meta(flow)
        if m.decision is None or not m.decision.passes:
            return  # our own 403: already complete, nothing to stream
        if m.bytes_in is None:
            m.bytes_in = 0

        def add(n: int) -> None:
            m.bytes_in += n
        # body replacements keep the length (Content-Length stays true): the placeholder, cut or
        # repeated to the secret's length
        pairs = [(s, (p * (len(s) // len(p) + 1))[:len(s)]) for s, p in m.secrets]
        flow.response.stream = Scrubber(pairs, add)

    def websocket_message(self, flow: http.HTTPFlow) -> None:
        m = flow_meta(flow)
        msg = flow.websocket.messages[-1]
        if msg.from_client:
            m.ws_out += len(msg.content)
        else:
            m.ws_in += len(msg.content)
        del flow.websocket.messages[:]  # the layer keeps its own reference to the current message

    def tcp_message(self, flow) -> None:
        m = flow_meta(flow)
        msg = flow.messages[-1]
        if msg.from_client:
            m.bytes_out = (m.bytes_out or 0) + len(msg.content)
        else:
            m.bytes_in = (m.bytes_in or 0) + len(msg.content)
        del flow.messages[:]
