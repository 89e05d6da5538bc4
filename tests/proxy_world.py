"""The real proxy service wired as a kernel's egress, for host-side proxy tests (no tests here):
ProxyService (mitmproxy in its own process) + AuditLog + one EgressBridge per kernel on Unix
sockets standing in for vsock ports 5002/5003, and a `Guest` client per kernel.

    w = ProxyWorld(tmp, env={"CAPSEM_X": "..."})        # CAPSEM_DATA_DIR / _RUNTIME_DIR under tmp
    tls = upstream_tls(tmp, "my test upstream CA")       # a CA the service trusts, a leaf for servers
    ... start upstream servers; w.on_close(server.close) ...
    await w.start({"k-1": policy}, resolve={...}, upstream_ca=tls.ca_file, workers=1)
    w.guests["k-1"].http(...); w.rows(rule="x"); await w.close()

Modules hang their own upstreams and ports on the same object."""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path

import pytest

from capsem_vm.proxy import AuditLog, EgressBridge, ProxyService, ca_cert_pem, read_events
from proxy_helpers import Guest, make_ca, make_leaf, wait_for, write_pem


@dataclass
class UpstreamTLS:
    ca_file: str    # the test CA, for the proxy service's upstream_ca
    cert_file: str  # a leaf for *.test.example and 127.0.0.1, signed by it
    key_file: str

    def server_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(self.cert_file, self.key_file)
        return ctx


def upstream_tls(tmp: Path, cn: str) -> UpstreamTLS:
    ca_key, ca_cert = make_ca(cn)
    leaf_key, leaf = make_leaf(ca_key, ca_cert, ["*.test.example"], ["127.0.0.1"])
    return UpstreamTLS(write_pem(tmp / "upstream-ca.pem", cert=ca_cert), write_pem(tmp / "leaf.pem", cert=leaf),
                       write_pem(tmp / "leaf.key", key=leaf_key))


class ProxyWorld:
    def __init__(self, tmp: Path, env: dict[str, str] | None = None):
        """With `env` (even empty): CAPSEM_DATA_DIR and CAPSEM_RUNTIME_DIR under tmp plus `env`, set
        until close()."""
        self.tmp = tmp
        self.mp = pytest.MonkeyPatch()
        if env is not None:
            for k, v in {"CAPSEM_DATA_DIR": str(tmp / "data"), "CAPSEM_RUNTIME_DIR": str(tmp / "run"), **env}.items():
                self.mp.setenv(k, v)
        self._closers: list = []
        self.bridges: dict[str, EgressBridge] = {}
        self.guests: dict[str, Guest] = {}
        self.service = self.audit = None

    def on_close(self, fn) -> None:
        """Call fn() at close(), after the service has stopped (upstream servers)."""
        self._closers.append(fn)

    async def start(self, kernels: dict, *, audit_db: Path | None = None, **service_kw) -> "ProxyWorld":
        """Start the service (ProxyService keyword arguments; log in tmp/proxy.log) and one bridge +
        Guest per kernel id -> policy."""
        self.audit_db = audit_db or self.tmp / "audit.sqlite3"
        self.log_path = self.tmp / "proxy.log"
        self.service = ProxyService(audit_db=self.audit_db, log_path=self.log_path, **service_kw)
        await self.service.start()
        self.audit = AuditLog(self.audit_db)
        self.ca_file = str(self.tmp / "capsem-ca.pem")
        Path(self.ca_file).write_bytes(ca_cert_pem())
        for kid, policy in kernels.items():
            ep = await self.service.register(kid, policy)
            bridge = EgressBridge(kid, policy, ep, audit=self.audit)
            egress, dns = str(self.tmp / f"{kid}.vsock_5002"), str(self.tmp / f"{kid}.vsock_5003")
            await bridge.start(egress, dns)
            self.bridges[kid] = bridge
            self.guests[kid] = Guest(egress, dns, self.ca_file)
        return self

    async def close(self) -> None:
        for bridge in self.bridges.values():
            await bridge.close()
        if self.service is not None:
            await self.service.close()
        if self.audit is not None:
            self.audit.close()
        for fn in self._closers:
            fn()
        self.mp.undo()

    def rows(self, **match) -> list[dict]:
        """Audit rows matching every field (a callable value is a predicate on the field), waiting up
        to 10 s for at least one (the proxy workers write theirs a moment later)."""
        self.audit.flush()
        return wait_for(lambda: [r for r in read_events(self.audit_db, limit=100000) if all(
            (v(r.get(k)) if callable(v) else r.get(k) == v) for k, v in match.items())], 10)
