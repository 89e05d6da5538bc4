"""SOCKS5 username/password: only registered kernels' bridges may use the listener.

mitmproxy asks for SOCKS5 credentials only while the `proxyauth` option is set, so this addon
declares that option itself (the stock ProxyAuth addon, whose "any" mode accepts everyone, is not
loaded). The username is the kernel id, which attributes every flow of the connection.
"""

from __future__ import annotations

import logging

from mitmproxy.proxy.layers import modes

from .state import Session, State

log = logging.getLogger("capsem.auth")


class KernelAuth:
    def __init__(self, state: State):
        self.state = state

    def load(self, loader):
        loader.add_option("proxyauth", str, "capsem-kernels",
                          "Set by capsem: SOCKS5 credentials are checked against registered kernels.")

    def socks5_auth(self, data: modes.Socks5AuthData) -> None:
        kernel = self.state.kernels.get(data.username)
        if kernel is not None and kernel.check(data.password):
            data.valid = True
            self.state.sessions[data.client_conn.id] = Session(kernel)
        else:
            data.valid = False
            log.warning("rejected SOCKS5 credentials from %s", data.client_conn.peername)

    def client_disconnected(self, client) -> None:
        self.state.sessions.pop(client.id, None)  # its header deadline goes with it
