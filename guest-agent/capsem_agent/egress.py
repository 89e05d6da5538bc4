"""egress_setup: route everything the guest sends out through the host's egress policy.

    {"t": "egress_setup", "id", "ca_pem": <PEM certificate(s)>, "env"?: {name: value}}
      -> {"t": "ok", "id", "proxy": url, "dns": "ip:port", "capture": "ip:port", "seconds": float}

In order: trust the CA (trust.py); start the stub resolver (dns_stub.py), the transparent
capture listener (capture.py) and the HTTP proxy (httpproxy.py); plumb the network (netsetup.py:
dummy route, nftables redirect and drops, IPv6 off, resolv.conf); then every exec and kernel
started afterwards gets the proxy and CA variables plus the host's `env` (e.g. credential
placeholders) in its environment (procs.EGRESS_ENV). Idempotent: a second call replaces the CA
and env and re-applies the rules; the listeners keep running.

egress_prepare {id, ca_pem?} (a pooled VM, before it is claimed) does the policy-independent part
ahead of time: the listeners, the network plumbing and, given the host's CA certificate (public;
the same for all kernels of the user), the trust. Nothing gets out through them until the host
listens on its egress ports, which it does only at claim time; egress_setup then sets the env
(and installs the CA only if it differs from the one prepared).

Outside a VM (host-side tests of the agent) nothing system-wide is touched: no netsetup, the CA
goes to a file under the run dir, and the listeners take free ports.
"""

from __future__ import annotations

import os
import threading
import time

from . import capture, dns_stub, httpproxy, ipykernel_host, netsetup, procs, protocol, sysinit, trust

NO_PROXY = "localhost,127.0.0.1,::1"
ENV_NAME_MAX = 256


class Egress:
    def __init__(self):
        self._lock = threading.Lock()
        self.servers: dict[str, object] = {}
        self.addresses: dict[str, tuple[str, int]] = {}
        self.prepared = False
        self.trusted: tuple[str, str, str] | None = None  # (PEM, bundle, CA file) installed

    def prepare(self, ca_pem: str | None = None) -> dict:
        """Listeners and network plumbing, no env; the CA too if given (blocking: run it in a
        thread). Raises trust.TrustError for a bad CA."""
        t0 = time.monotonic()
        steps: dict[str, float] = {}
        with self._lock:
            if ca_pem is not None:
                self._trust(ca_pem)
                steps["trust"] = round(time.monotonic() - t0, 3)
            if not self.prepared:
                in_vm = sysinit.IN_VM
                self._start_servers(in_vm)
                steps["listeners"] = round(time.monotonic() - t0, 3)
                if in_vm:
                    steps.update(netsetup.setup())
                self.prepared = True
        return {"seconds": round(time.monotonic() - t0, 3), "steps": steps}

    def setup(self, msg: dict) -> dict:
        """Blocking (subprocesses, files): run it in a thread. Raises on failure."""
        pem = protocol.req_str(msg, "ca_pem", max_len=trust.MAX_PEM)
        extra = protocol.req_env(msg, "env")
        for name in extra:
            if len(name) > ENV_NAME_MAX or not name.replace("_", "").isalnum():
                raise protocol.MessageError(f"egress_setup: bad env name {name[:64]!r}", msg["id"])
        t0 = time.monotonic()
        in_vm = sysinit.IN_VM
        steps: dict[str, float] = {}
        with self._lock:
            try:
                bundle, ca_file = self._trust(pem)
            except trust.TrustError as exc:
                raise protocol.MessageError(f"egress_setup: {exc}", msg["id"]) from None
            steps["trust"] = round(time.monotonic() - t0, 3)
            if not self.prepared:  # else egress_prepare did it (a pooled VM)
                self._start_servers(in_vm)
                steps["listeners"] = round(time.monotonic() - t0 - steps["trust"], 3)
                if in_vm:
                    steps.update(netsetup.setup())
            proxy = "http://%s:%d" % self.addresses["proxy"]
            env = {
                "HTTP_PROXY": proxy, "HTTPS_PROXY": proxy, "http_proxy": proxy, "https_proxy": proxy,
                "NO_PROXY": NO_PROXY, "no_proxy": NO_PROXY,
                "SSL_CERT_FILE": bundle, "REQUESTS_CA_BUNDLE": bundle, "PIP_CERT": bundle,
                "CURL_CA_BUNDLE": bundle, "NODE_EXTRA_CA_CERTS": ca_file,
            }
            env.update(extra)
            procs.EGRESS_ENV.clear()
            procs.EGRESS_ENV.update(env)
        return {"proxy": proxy, "dns": "%s:%d" % self.addresses["dns"],
                "capture": "%s:%d" % self.addresses["capture"], "seconds": round(time.monotonic() - t0, 3),
                "steps": steps}

    def _trust(self, pem: str) -> tuple[str, str]:
        """Install the CA (bundle path, CA file path); a CA already installed by egress_prepare
        is not written again (that is most of egress_setup's time in a just-claimed VM)."""
        pem = trust.check_pem(pem)
        if self.trusted is not None and self.trusted[0] == pem:
            return self.trusted[1], self.trusted[2]
        if sysinit.IN_VM:
            bundle = trust.BUNDLE
            ca_file = trust.install(pem)
        else:
            d = os.path.join(ipykernel_host.rundir(), "egress")
            os.makedirs(d, mode=0o755, exist_ok=True)
            bundle = os.path.join(d, "ca-bundle.crt")
            ca_file = trust.install(pem, bundle=bundle, cert_file=os.path.join(d, "capsem-egress.crt"))
        self.trusted = (pem, bundle, ca_file)
        return bundle, ca_file

    def _start_servers(self, in_vm: bool) -> None:
        if self.servers:
            return
        # in the VM the well-known ports (netsetup and the env name them); elsewhere free ones
        dns_port, capture_port, proxy_port = ((dns_stub.PORT, capture.PORT, httpproxy.PORT) if in_vm
                                              else (0, 0, 0))
        forwarder, udp, tcp = dns_stub.start(port=dns_port)
        self.servers["dns"] = (udp, tcp)
        self.addresses["dns"] = udp.sock.getsockname()[:2]
        cap = capture.start(port=capture_port)
        self.servers["capture"] = cap
        self.addresses["capture"] = cap.listener.getsockname()[:2]
        prx = httpproxy.start(port=proxy_port)
        self.servers["proxy"] = prx
        self.addresses["proxy"] = prx.listener.getsockname()[:2]
