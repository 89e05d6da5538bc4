"""EgressBridge: one per VM, in the process that owns the VM (no mitmproxy import here).

It serves the guest's two egress vsock ports and turns them into policy-checked traffic:

    5003 dns     frames {"t":"dns","data":b64(query)} -> {"t":"dns","data":b64(answer)}; answered here
                 (NXDOMAIN for names the policy can never allow, synthetic IPv4 for the others)
    5002 egress  first frame {"t":"connect","host":..,"port":..}; the bridge answers one frame,
                 {"t":"connected"} or {"t":"refused","reason":..,"rule":..}, then raw bytes flow

Each allowed egress stream becomes a SOCKS5 connection to the proxy service, authenticated with
this kernel's own username/password (registered with the service), naming the destination the
guest asked for (synthetic addresses are mapped back to their names first). While no worker of
the service serves (a dead one is being replaced: proxy/supervisor.py), allowed streams are
refused with code `proxy-restarting` (`proxy-unavailable` if nobody replaces it), and audited here.

API (all async, on the VM owner's event loop):

    endpoint = await service.register(kernel_id, policy)       # ProxyService, see service.py
    bridge = EgressBridge(kernel_id, policy, endpoint, audit=AuditLog())
    await bridge.start(egress_path=f"{uds}_5002", dns_path=f"{uds}_5003")   # vhost-user vsock
    #   or: await bridge.attach(transport)  # any VsockTransport: listen(5002/5003, handler)
    ...
    await bridge.close()                                        # closes listeners and streams

`handle_egress(reader, writer)` and `handle_dns(reader, writer)` are public for other transports.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from dataclasses import dataclass

from capsem_agent import protocol

from .. import safetext
from ..policy import Policy
from ..policy.addresses import own_addresses, protected_class
from ..policy.match import normalize_host, parse_ip
from ..rate import Throttle
from . import dns, socks5
from .audit import AuditLog
from .dns_responder import DnsResponder
from .service import ProxyEndpoint
from .splice import splice
from .synthetic import SyntheticPool
from ..vsock.hangup import hang_up

log = logging.getLogger(__name__)

CONNECT_FRAME_MAX = 4096
WORKER_DEATH_POLLS = 20  # x 10 ms: how long a failed SOCKS handshake waits to tell a dead worker


class EgressBridge:
    def __init__(self, kernel_id: str, policy: Policy, proxy: ProxyEndpoint, *,
                 audit: AuditLog | None = None, pool: SyntheticPool | None = None,
                 max_streams: int = 256, max_dns_streams: int = 8, first_frame_timeout: float = 10.0,
                 idle_timeout: float = 600.0, dns_rate: float = 100.0, dns_burst: float = 200.0):
        self.kernel_id = kernel_id
        self.policy = policy
        self.proxy = proxy
        self.audit = audit
        self.pool = pool if pool is not None else SyntheticPool()
        self.dns = DnsResponder(policy, self.pool, rate=dns_rate, burst=dns_burst)
        self.max_streams = max_streams
        self.max_dns_streams = max_dns_streams  # the guest's stub uses one; each costs a host fd
        self._dns_streams = 0
        self._unaudited = Throttle(1.0)  # refusals for audit-unavailable: one log line a second
        self.first_frame_timeout = first_frame_timeout
        self.idle_timeout = idle_timeout
        self._servers: list[asyncio.AbstractServer] = []
        self._tasks: set[asyncio.Task] = set()
        self._streams = 0
        self._closed = False
        self._next_port = 0

    # --- lifecycle -----------------------------------------------------------------------------

    async def start(self, egress_path: str | os.PathLike, dns_path: str | os.PathLike) -> None:
        """Listen on the Unix sockets where the vsock backend delivers guest connections to host
        ports 5002 and 5003 (vhost-device-vsock: `<uds>_5002`, `<uds>_5003`). Mode 0600."""
        for path, handler in ((egress_path, self.handle_egress), (dns_path, self.handle_dns)):
            path = os.fspath(path)
            if os.path.exists(path):
                os.unlink(path)
            old = os.umask(0o177)
            try:
                server = await asyncio.start_unix_server(handler, path=path)
            finally:
                os.umask(old)
            self._servers.append(server)

    async def attach(self, transport) -> None:
        """Serve the egress ports through a capsem_vm.vsock transport."""
        await transport.listen(protocol.PORT_EGRESS, self.handle_egress)
        await transport.listen(protocol.PORT_DNS, self.handle_dns)

    async def close(self) -> None:
        self._closed = True
        for s in self._servers:
            s.close()
        for t in list(self._tasks):
            t.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        self._servers.clear()

    def _track(self) -> None:
        task = asyncio.current_task()
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _audit(self, kind: str, **fields) -> None:
        """One row; refusals are rate-bounded and counted by the AuditLog (audit_rate.py)."""
        if self.audit:
            self.audit.record(self.kernel_id, kind, **fields)

    def _audit_limit(self, kind: str, reason: str, code: str = "limit") -> None:
        """A refusal for a limit or a protocol violation (no destination known)."""
        self._audit(kind, decision="deny", rule=code, code=code, reason=reason)

    def _audit_unavailable(self) -> bool:
        """True (and logged, at most once a second) if the audit log cannot be written now."""
        if self.audit is None or self.audit.available:
            return False
        if n := self._unaudited.count(time.monotonic()):
            log.error("kernel %s: %d egress/DNS request(s) refused: the audit log cannot be written (%s)",
                      self.kernel_id, n, safetext.escape(self.audit.last_error or "?"))
        return True

    # --- DNS -----------------------------------------------------------------------------------

    async def handle_dns(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._track()
        if self._dns_streams >= self.max_dns_streams:
            self._audit_limit("dns", "too many concurrent DNS streams")
            writer.close()
            return
        self._dns_streams += 1
        try:
            while not self._closed:
                try:
                    msg = await _read_frame(reader, 8192, None)
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                if msg is None or msg.get("t") != "dns":
                    writer.write(protocol.encode(protocol.error("bad-frame", "expected a dns frame")))
                    return
                try:
                    query = protocol.req_data(msg, "data")
                except protocol.MessageError:
                    writer.write(protocol.encode(protocol.error("bad-frame", "invalid dns data")))
                    return
                now = time.monotonic()
                if self._audit_unavailable():
                    # fail closed: an unaudited answer could name an allowed host (REFUSED, no address)
                    answer, event = _refused_answer(query), None
                else:
                    answer, event = self.dns.answer(query, now)
                limited = self.dns.take_rate_limited() if event else 0
                if limited:
                    self._audit("dns", decision="deny", rule="dns-rate", code="dns-rate",
                                reason=f"{limited} queries refused (rate limit)")
                if event:
                    self._audit("dns", method=event.qtype, url=event.name, host=event.name, status=event.rcode,
                                decision=event.decision, rule=event.rule, code=event.code,
                                reason=event.reason + (f" -> {event.answer}" if event.answer else ""))
                reply = {"t": "dns", "data": protocol.b64(answer)} if answer else {"t": "dns", "drop": True}
                writer.write(protocol.encode(reply))
                await writer.drain()
        except asyncio.CancelledError:
            pass
        finally:
            self._dns_streams -= 1
            writer.close()

    # --- egress --------------------------------------------------------------------------------

    def _destination(self, msg: dict) -> tuple[str, int, str | None]:
        """(host, port, error). host is what the policy judges: a name or an IP literal."""
        try:
            host = protocol.req_str(msg, "host", max_len=260)
            port = protocol.req_int(msg, "port", lo=1, hi=65535)
        except protocol.MessageError as exc:
            return "", 0, str(exc)
        norm = normalize_host(host)  # first: "0xc6.0x12.0.1" is a synthetic address too
        if norm is None:
            return host[:260], port, "not a valid host name or address"
        if self.pool.contains(norm):
            name = self.pool.name_for(norm)
            if name is None:
                return norm, port, "unknown synthetic address (its DNS answer expired): resolve the name again"
            return name, port, None
        return norm, port, None

    async def handle_egress(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._track()
        if self._streams >= self.max_streams:
            self._audit_limit("connect", "too many concurrent streams")
            await _refuse(reader, writer, "too many concurrent connections from this VM", "limit", "limit")
            return
        self._streams += 1
        up_writer = target = None
        try:
            msg = await self._first_frame(reader, writer)
            if msg is None:
                return
            host, port, refusal = self._judge(msg)
            target = f"{host}:{port}"
            if refusal is not None:
                self._audit("connect", url=target, host=host, port=port, decision="deny", rule=refusal.rule,
                            code=refusal.code, reason=refusal.reason)
                await _refuse(reader, writer, refusal.reason, refusal.rule, refusal.code)
                return
            upstream = await self._open_upstream(host, port, reader, writer)
            if upstream is None:
                return
            up_reader, up_writer = upstream
            writer.write(protocol.encode({"t": "connected"}))
            await writer.drain()
            await splice(reader, writer, up_reader, up_writer, self.idle_timeout)
        except asyncio.CancelledError:
            pass
        except Exception:  # pragma: no cover - a bug must not kill the VM owner's loop
            log.exception("egress stream to %s failed", safetext.escape(str(target)))
        finally:
            self._streams -= 1
            for w in (writer, up_writer):
                if w is not None:
                    w.close()

    async def _first_frame(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> dict | None:
        """The stream's connect frame, or None once a broken one was audited (and answered)."""
        try:
            msg = await _read_frame(reader, CONNECT_FRAME_MAX, self.first_frame_timeout)
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.TimeoutError):
            self._audit_limit("connect", "egress stream without a complete first frame", "protocol")
            return None
        if msg is None or msg.get("t") != "connect":
            self._audit_limit("connect", "egress stream with a malformed first frame", "protocol")
            await _refuse(reader, writer, "first frame must be {\"t\": \"connect\", ...}", "protocol", "protocol")
            return None
        return msg

    def _judge(self, msg: dict) -> tuple[str, int, Refusal | None]:
        """(host, port, why not): the destination, then the checks in order: a valid host, the
        policy's connection decision, deny rules covering an IP literal, protected addresses,
        and an audit log that can be written (fail closed)."""
        host, port, error = self._destination(msg)
        if error:
            return host, port, Refusal("invalid-host", "invalid-host", error)
        # observe mode: a policy refusal passes as would-deny (the proxy service judges and audits
        # the connection again); built-in refusals and the address checks below stay
        decision = self.policy.observed(self.policy.decide_connect(host, port))
        if not decision.passes:
            return host, port, Refusal(decision.rule, decision.code, decision.reason)
        ip = parse_ip(host)
        denied = self.policy.address_denied(ip, port) if ip is not None else None
        if denied is not None:  # e.g. a deny rule for an IPv4 network, and its NAT64 spelling
            denied = self.policy.observed(denied)
            if not denied.passes:
                return host, port, Refusal(denied.rule, denied.code, denied.reason)
            decision = denied  # would-deny: reaches no protected address (Decision.address_allowed)
        if ip is not None and not decision.address_allowed(ip):
            reason = (f"this address is protected ({protected_class(ip, own_addresses())}: loopback, private, "
                      "link-local, multicast, NAT64, 6to4, this host's own, ...) and no rule names it")
            return host, port, Refusal("address", "address", reason)
        if self._audit_unavailable():
            reason = "the audit log cannot be written: egress is refused rather than unaudited"
            return host, port, Refusal("audit-unavailable", "audit-unavailable", reason)
        if self.proxy is None or not self.proxy.serving_ports():
            return host, port, self._proxy_down()
        return host, port, None

    def _proxy_down(self) -> Refusal:
        """Why an allowed stream cannot go out now: the proxy service is not there."""
        if self.proxy is not None and self.proxy.restarting:
            return Refusal("proxy-restarting", "proxy-restarting",
                           "the egress proxy is restarting after a crash: try again in a moment")
        return Refusal("proxy-unavailable", "proxy-unavailable", "the egress proxy is not running")

    async def _open_upstream(self, host: str, port: int, reader: asyncio.StreamReader,
                             writer: asyncio.StreamWriter):
        """A SOCKS5 connection through the proxy service to host:port, or None once the guest got
        a refusal (the service audits its own refusals in detail: address checks, upstream errors).
        A worker found dead on the way is skipped for another; with none left, the refusal is
        proxy-restarting (or proxy-unavailable), audited here: no proxy row exists for it."""
        dead: set[int] = set()
        while True:
            upstream = await self._connect_proxy(dead)
            if upstream is None:
                down = self._proxy_down()
                self._audit("connect", url=f"{host}:{port}", host=host, port=port, decision="deny",
                            rule=down.rule, code=down.code, reason=down.reason)
                await _refuse(reader, writer, down.reason, down.rule, down.code)
                return None
            worker, up_reader, up_writer = upstream
            try:
                await asyncio.wait_for(socks5.handshake(up_reader, up_writer, host, port,
                                                        self.proxy.username, self.proxy.password), 60)
                return up_reader, up_writer
            except BaseException as exc:
                up_writer.close()
                if not isinstance(exc, (OSError, socks5.Socks5Error, asyncio.TimeoutError)):
                    raise  # cancelled (the bridge closes), or a bug: handle_egress deals with it
                lost = isinstance(exc, ConnectionError) or up_reader.at_eof()  # not a SOCKS refusal
                if lost and await self._worker_died(worker):  # killed under us: nothing went out
                    dead.add(worker)
                    continue
                reason = f"the proxy did not connect ({exc.__class__.__name__}: {exc})"
                await _refuse(reader, writer, reason[:500], "proxy", "error")  # the proxy's own row has the precise code
                return None

    async def _connect_proxy(self, dead: set[int]):
        """(port, reader, writer) of a connection to a serving worker, spread over them; a worker
        that refuses (it just died) is added to `dead` and skipped. None if none could be reached."""
        ports = [p for p in self.proxy.serving_ports() if p not in dead]
        start, self._next_port = self._next_port, self._next_port + 1
        for i in range(len(ports)):
            port = ports[(start + i) % len(ports)]
            try:
                return port, *await asyncio.wait_for(asyncio.open_connection(self.proxy.host, port), 10)
            except OSError:
                dead.add(port)
            except asyncio.TimeoutError:
                return None
        return None

    async def _worker_died(self, port: int) -> bool:
        """The worker on `port` left the serving set, waiting a moment for its death to be noticed
        (its control pipe and our connection to it close at the same time)."""
        for _ in range(WORKER_DEATH_POLLS):
            if port not in self.proxy.serving_ports():
                return True
            await asyncio.sleep(0.01)
        return False


@dataclass(frozen=True)
class Refusal:
    """Why an egress stream is refused: the audit row's rule, code and reason, and the guest's."""
    rule: str
    code: str
    reason: str


async def _read_frame(reader: asyncio.StreamReader, max_len: int, timeout: float | None) -> dict | None:
    """One frame read exactly (bytes after it stay in `reader` for the relay); None if it is not
    a message. A truncated stream raises asyncio.IncompleteReadError."""
    read = protocol.read_message(reader, max_len)
    try:
        return await asyncio.wait_for(read, timeout) if timeout else await read
    except (protocol.FrameError, protocol.MessageError):
        return None


def _refused_answer(query: bytes) -> bytes | None:
    try:
        return dns.build_response(dns.parse_query(query), dns.REFUSED)
    except dns.DnsParseError:
        return None


async def _refuse(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, reason: str, rule: str,
                  code: str) -> None:
    try:
        writer.write(protocol.encode({"t": "refused", "reason": reason[:1000], "rule": rule, "code": code}))
    except ConnectionError:
        pass
    await hang_up(reader, writer)  # drains the frame, then closes so that the guest sees EOF
