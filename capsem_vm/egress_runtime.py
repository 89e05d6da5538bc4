"""The egress runtime: the proxy service a set of VMs share, how many of them use it, and the audit
log their bridges write. Each VM's `Egress` (egress.py) borrows the service from its runtime and
records through its audit log.

Who owns one:
- whoever builds VMs itself (tests, `capsem vm run`, later a Sandbox API) creates one, hands it to
  `VM(config, egress_runtime=rt)` and closes it: `async with EgressRuntime() as rt: ...`;
- kernel provisioners cannot be handed one (jupyter_client builds them from an entry point, with
  config only): they, and the server extension's audit barrier, reach the process's runtime
  through `process_runtime()`, the one process-wide accessor. It is made on first use and lives
  as long as the process (the service's processes die with it: proxy/service.py). An owner that
  wants its own runtime used by the provisioners of this process (the egress test world) installs
  it with `set_process_runtime()` and puts the previous one back when done.

A runtime belongs to one event loop (the capsem loop thread's, for the process runtime): its
service's pipes and its idle timer live there.

The service is started on demand (the first VM whose policy can allow something) and, when the
last user is gone, stopped after `idle` seconds (kernel restarts find it warm);
`release_service()` stops it at once (one-shot commands). While it runs, a supervisor
(proxy/supervisor.py) replaces any worker process that dies, within a second when it does not
keep dying, and registers every kernel with the new one again; `proxy_state()` says how it is.
"""

from __future__ import annotations

import asyncio
import threading

from .proxy.audit import AuditLog
from .proxy.service import ProxyService
from .proxy.supervisor import ServiceSupervisor

SERVICE_IDLE = 120.0      # keep the proxy warm this long after the last VM (kernel restarts)


class EgressRuntime:
    def __init__(self, *, idle: float = SERVICE_IDLE, **service_options):
        """service_options: ProxyService's keyword arguments (tests: upstream_ca, resolve, ...)."""
        self.idle = idle
        self.service_options = service_options
        self.service: ProxyService | None = None
        self.supervisor: ServiceSupervisor | None = None  # of self.service
        self.users = 0
        self._audit: AuditLog | None = None
        self._audit_lock = threading.Lock()  # bridges (loop thread) and readers (tests) may open it at once
        self._lock = asyncio.Lock()  # binds to the loop of its first contended use
        self._idle_handle: asyncio.TimerHandle | None = None
        self._idle_task: asyncio.Task | None = None

    @property
    def audit(self) -> AuditLog:
        """The bridges' audit log (opened on first use, in the data dir of that moment)."""
        with self._audit_lock:
            if self._audit is None:
                self._audit = AuditLog()
            return self._audit

    async def __aenter__(self) -> "EgressRuntime":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    # --- the proxy service -----------------------------------------------------------------------

    async def proxy(self) -> ProxyService:
        """The service, started on first use, its dead workers replaced by its supervisor (while
        one is, the service is returned anyway: kernels registered now are registered with the
        new worker too). Counts no user."""
        async with self._lock:
            if self.service is None:
                service = ProxyService(**self.service_options)
                await service.start()  # closes what it started if it fails
                self.supervisor = ServiceSupervisor(service)
                self.service = service
            return self.service

    def proxy_state(self) -> dict:
        """How the proxy service is: `stopped`, or its supervisor's state (running, restarting,
        backoff, and the figures: restarts, last exit, last recovery time). Any thread."""
        supervisor = self.supervisor
        return supervisor.state() if supervisor is not None else {"state": "stopped"}

    async def _stop_service(self) -> None:
        service, self.service = self.service, None
        supervisor, self.supervisor = self.supervisor, None
        if supervisor is not None:
            await supervisor.stop()
        if service is not None:
            await service.close()

    async def acquire(self) -> ProxyService:
        """The service, for one more user (a VM); pair with release()."""
        self.users += 1
        self._cancel_idle()
        try:
            return await self.proxy()
        except BaseException:
            self.users -= 1
            raise

    def release(self) -> None:
        """One user fewer; once none is left, the service stops `idle` seconds later."""
        self.users -= 1
        if self.users == 0:
            loop = asyncio.get_running_loop()
            self._idle_handle = loop.call_later(self.idle, self._idle_out)

    def _idle_out(self) -> None:
        self._idle_handle = None
        self._idle_task = asyncio.get_running_loop().create_task(self.release_service())

    def _cancel_idle(self) -> None:
        if self._idle_handle is not None:
            self._idle_handle.cancel()
            self._idle_handle = None

    async def release_service(self) -> None:
        """Stop the service now if no VM uses it (flushes the audit log too)."""
        self._cancel_idle()
        if self.users == 0 and self.service is not None:
            await self._stop_service()
        if self._audit is not None:
            await asyncio.to_thread(self._audit.flush)

    # --- audit -----------------------------------------------------------------------------------

    async def audit_barrier(self, timeout: float = 10.0) -> bool:
        """The audit barrier (docs/AUDIT.md): returns once every audit row caused before the call is
        written, by this runtime's bridges (DNS, refused streams, the control port) and by every
        worker of its proxy service, pending counts of aggregated refusals included. False if that
        could not be done (a database that cannot be written, a worker gone, the timeout).
        Every writer is flushed whole (cheap), whichever kernel the reader wants."""
        ok = True
        service = self.service
        if service is not None:  # False while a worker is dead: its unwritten rows are lost
            ok = await service.flush_audit(timeout)
        if self._audit is not None:
            ok = await asyncio.to_thread(self._audit.flush, timeout) and ok
        return ok

    async def close(self) -> None:
        """Stop the service (whoever still uses it) and close the audit log (written out first)."""
        self._cancel_idle()
        await self._stop_service()
        with self._audit_lock:
            audit, self._audit = self._audit, None
        if audit is not None:
            await asyncio.to_thread(audit.close)


# --- the one process-wide accessor ----------------------------------------------------------------

# Process-wide by necessity: provisioners are made by jupyter_client with config only. Owner: this
# process (or whoever installed its own runtime with set_process_runtime, until it puts one back).
_process_lock = threading.Lock()
_process: EgressRuntime | None = None


def process_runtime() -> EgressRuntime:
    """The runtime of code that cannot be handed one: kernel provisioners and the server extension
    (see the module docstring). Made on first use; lives as long as the process."""
    global _process
    with _process_lock:  # first use may come from the loop thread and a test's thread at once
        if _process is None:
            _process = EgressRuntime()
        return _process


def set_process_runtime(runtime: EgressRuntime | None) -> EgressRuntime | None:
    """Make `runtime` (owned and closed by the caller) the process runtime; None: a new one is made
    on next use. Returns the one it replaces, for the caller to put back."""
    global _process
    with _process_lock:
        previous, _process = _process, runtime
        return previous
