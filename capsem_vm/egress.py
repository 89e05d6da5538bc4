"""Host side of one VM's egress: its policy, its EgressBridge, the shared proxy service, and the
guest's egress_setup.

    VMConfig(egress=EgressConfig(policy="/etc/capsem/lab.toml", kernel_id=kid))

VM.start() opens an `Egress` before QEMU starts (the policy is loaded and checked then, and the
bridge's vsock ports 5002/5003 listen), sends egress_setup right after the agent's hello, and
VM.stop() closes it. Where the policy comes from: `EgressConfig.policy` (the kernelspec / Jupyter
config / `capsem vm run --policy`), else the user's config dir, else deny-all; never a folder the
guest can write (capsem_vm.policy.source).

The proxy service (mitmproxy, its own process) is shared by every VM of one EgressRuntime
(egress_runtime.py: the VM's owner's, else the process's) and started on demand: only when a policy
can allow something, in parallel with the boot. The runtime stops it a while after its last VM is
gone. Its processes die with ours in any case (service.py).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import secrets
from capsem_agent import protocol

from .config import EgressConfig
from .egress_runtime import EgressRuntime, process_runtime
from .policy import ALLOW, Policy, load_kernel_policy
from .proxy.audit import AuditLog
from .proxy.bridge import EgressBridge
from .proxy.ca import ca_cert_pem
from .proxy.service import ProxyService
from .vsock.hangup import hang_up

log = logging.getLogger(__name__)

PROXY_WAIT = 90.0         # the proxy service start (mitmproxy import) on a loaded host
SETUP_TIMEOUT = 90.0      # egress_setup in the guest: module loading + nft under TCG


def needs_proxy(policy: Policy) -> bool:
    """The policy can let something out: it needs the proxy service. Observe mode: what the rules
    refuse goes out too (as would-deny), through the proxy."""
    return policy.observe or any(r.action == ALLOW for r in policy.rules)


# --- one VM ---------------------------------------------------------------------------------------

class Egress:
    def __init__(self, config: EgressConfig, guest_writable: list[str] = (),
                 runtime: EgressRuntime | None = None):
        """runtime: whose proxy service and audit log this VM uses (None: process_runtime())."""
        self.config = config
        self.runtime = runtime or process_runtime()
        self.guest_writable = list(guest_writable)
        self.kernel_id = config.kernel_id or f"vm-{secrets.token_hex(6)}"
        self.policy: Policy | None = None
        self.bridge: EgressBridge | None = None
        self.service: ProxyService | None = None
        self.setup_reply: dict | None = None
        self._ca_pem: str | None = None
        self._ready: asyncio.Future | None = None
        self._task: asyncio.Task | None = None
        self._closed = False
        self._reload_lock = asyncio.Lock()  # one reload at a time (binds to the loop of its first use)

    @property
    def audit(self) -> AuditLog:
        """Where this VM's host-side audit rows go (its runtime's log)."""
        return self.runtime.audit

    @property
    def needs_proxy(self) -> bool:
        return needs_proxy(self.policy)

    async def start(self, transport) -> None:
        """Load the policy, listen on the egress ports, start the proxy service in the background.
        Call before QEMU starts. Raises PolicyError for a bad or misplaced policy."""
        self.policy = await asyncio.to_thread(load_kernel_policy, self.config.policy, self.guest_writable)
        if self.config.observe:  # the kernelspec's observe trait (capsem kernel install --observe)
            self.policy = dataclasses.replace(self.policy, observe=True)
        self._ca_pem = (await asyncio.to_thread(ca_cert_pem)).decode()
        self._ready = asyncio.get_running_loop().create_future()
        await transport.listen(protocol.PORT_EGRESS, self._on_egress)
        await transport.listen(protocol.PORT_DNS, self._on_dns)
        if self.needs_proxy:
            self._task = asyncio.ensure_future(self._connect_proxy())
        else:  # nothing can be allowed: the bridge answers everything itself
            self._make_bridge(None)

    def _make_bridge(self, endpoint) -> None:
        self.bridge = EgressBridge(self.kernel_id, self.policy, endpoint, audit=self.audit)
        if not self._ready.done():
            self._ready.set_result(self.bridge)

    async def _connect_proxy(self) -> None:
        try:
            self.service = await self.runtime.acquire()
            try:
                endpoint = await self.service.register(self.kernel_id, self.policy)
            except BaseException:
                self.runtime.release()
                self.service = None
                raise
            self._make_bridge(endpoint)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.error("egress proxy for %s failed to start: %s", self.kernel_id, exc)
            if not self._ready.done():
                self._ready.set_exception(exc)

    async def _bridge(self) -> EgressBridge:
        return await asyncio.wait_for(asyncio.shield(self._ready), PROXY_WAIT)

    async def _on_egress(self, reader, writer) -> None:
        try:
            bridge = await self._bridge()
        except Exception as exc:  # noqa: BLE001 - the guest gets a reason, the stream closes
            writer.write(protocol.encode({"t": "refused", "rule": "proxy", "code": "proxy-unavailable",
                                          "reason": f"the egress proxy is not available: {exc}"[:500]}))
            await hang_up(reader, writer)
            return
        await bridge.handle_egress(reader, writer)

    async def _on_dns(self, reader, writer) -> None:
        try:
            bridge = await self._bridge()
        except Exception:  # noqa: BLE001
            await hang_up(reader, writer)
            return
        await bridge.handle_dns(reader, writer)

    async def reload_policy(self, change: dict | None = None) -> Policy:
        """Load this VM's policy file again and put it in force without a restart: the proxy
        service's registration (same SOCKS password, so the bridge keeps its endpoint; workers
        restarted later get it too), the bridge and its DNS answers. A policy that now allows
        something and had no proxy gets one. `change`: the audit fields of the policy-change row
        (url: the file, rule, reason: who changed what); one is written in any case.
        PolicyError (nothing changed) for an invalid or misplaced file. What does not follow: the
        guest environment of a new credential (sent once at boot: egress_setup)."""
        await self._bridge()  # the first registration is done: a reload cannot race it
        async with self._reload_lock:
            return await self._reload(change)

    async def _reload(self, change: dict | None) -> Policy:
        policy = await asyncio.to_thread(load_kernel_policy, self.config.policy, self.guest_writable)
        if self.config.observe:
            policy = dataclasses.replace(policy, observe=True)
        if self.service is not None:
            await self.service.reload(self.kernel_id, policy)
        elif needs_proxy(policy):
            self.service = await self.runtime.acquire()
            try:
                self.bridge.proxy = await self.service.register(self.kernel_id, policy)
            except BaseException:
                self.runtime.release()
                self.service = None
                raise
        self.policy = policy
        self.bridge.policy = self.bridge.dns.policy = policy
        row = {"url": policy.source, "reason": "policy reloaded", **(change or {})}
        self.audit.record(self.kernel_id, "policy", decision="change", code="policy-change", **row)
        return policy

    async def setup_guest(self, control) -> dict:
        """Wait for the proxy, then have the agent trust the CA and route its traffic here."""
        await self._bridge()
        self.setup_reply = await control.request(
            {"t": "egress_setup", "ca_pem": self._ca_pem, "env": self.policy.guest_env()},
            timeout=SETUP_TIMEOUT)
        return self.setup_reply

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._task is not None and not self._task.done():
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._ready is not None and not self._ready.done():
            self._ready.cancel()  # guest streams still waiting for the proxy end now
        if self.bridge is not None:
            await self.bridge.close()
        if self.service is not None:
            try:
                await asyncio.wait_for(self.service.unregister(self.kernel_id), 10)
            except Exception as exc:  # noqa: BLE001 - the service may be gone already
                log.info("unregistering %s from the proxy service: %s", self.kernel_id, exc)
            self.runtime.release()
            self.service = None

    async def audit_barrier(self, timeout: float = 10.0) -> bool:
        """Every audit row this VM's egress caused so far is written (EgressRuntime.audit_barrier)."""
        ok = True
        if self.service is not None and self.service.alive:
            ok = await self.service.flush_audit(timeout)
        return await asyncio.to_thread(self.audit.flush, timeout) and ok

    def info(self) -> dict:
        return {"kernel_id": self.kernel_id, "policy": self.policy.source if self.policy else None,
                "proxy": bool(self.service), "guest": self.setup_reply,
                "proxy_service": self.runtime.proxy_state() if self.service else None}
