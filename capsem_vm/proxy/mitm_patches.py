"""Every patch of mitmproxy internals, in one place, behind a version gate (service process only).

Each patch below leans on a private detail of mitmproxy (a private method, a module constant, a
generator state). Those details change between releases without notice, so the service refuses to
start on a mitmproxy version nobody checked the patches against: an upgrade means reading this one
module against the new release, then adding the version to KNOWN_VERSIONS. docs/ARCHITECTURE.md
lists the patches and why ("mitmproxy patches").

The version gate runs when this module is imported, before any mitmproxy internal below is touched,
so an unknown version fails with the message here rather than an ImportError further down.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import metadata


@dataclass(frozen=True)
class Internals:
    """Where one mitmproxy release keeps the private details the patches below lean on."""
    why: str                   # why this version is trusted
    idle_timeout_option: bool  # the idle timeout is the `tcp_timeout` option (12.x), not the module
                               # constant proxy.server.TCP_TIMEOUT (11.0.2)
    crl_points: bool           # 12.x puts a CRL distribution point into every forged certificate and
                               # answers requests for it itself (TlsConfig.request): both switched off


# version -> where its internals are. Exactly the versions pyproject's `proxy` extra pins (by Python
# version, environment markers), which is what `capsem setup` installs (tests/test_setup_plan.py
# checks both ways). Every patch below was read against each of these releases' sources.
KNOWN_VERSIONS: dict[str, Internals] = {
    "11.0.2": Internals("pinned by the proxy extra for Python < 3.12 (the last release for Python 3.11)",
                        idle_timeout_option=False, crl_points=False),
    "12.3.1": Internals("pinned by the proxy extra for Python >= 3.12 (newest 12.x; needs Python >= 3.12)",
                        idle_timeout_option=True, crl_points=True),
}


class UnsupportedMitmproxy(RuntimeError):
    """The installed mitmproxy is not one the patches in this module were checked against."""


def installed_version() -> str:
    try:
        return metadata.version("mitmproxy")
    except metadata.PackageNotFoundError:
        return "none"


def check_version(found: str | None = None) -> str:
    """Return the installed mitmproxy version, or raise UnsupportedMitmproxy if it is not known."""
    found = installed_version() if found is None else found
    if found not in KNOWN_VERSIONS:
        raise UnsupportedMitmproxy(
            f"mitmproxy {found} is installed, but capsem's proxy patches mitmproxy internals and knows "
            f"only {', '.join(sorted(KNOWN_VERSIONS))}. Recreate the proxy env with `capsem setup` "
            f"(it installs a known version; in a source checkout `make proxy-venv`, which runs it), "
            f"or point CAPSEM_PROXY_PYTHON at one that has it; to support {found}, check each patch in capsem_vm/proxy/mitm_patches.py against it and add it to "
            f"KNOWN_VERSIONS.")
    return found


check_version()

import contextlib  # noqa: E402  (after the gate on purpose)
import inspect  # noqa: E402
import logging  # noqa: E402
import time  # noqa: E402

from mitmproxy import exceptions, flow, hooks, http  # noqa: E402
from mitmproxy.addonmanager import AddonManager  # noqa: E402
from mitmproxy.proxy import commands, events, server_hooks  # noqa: E402
from mitmproxy.proxy import server as proxy_server  # noqa: E402
from mitmproxy.proxy.layers.http import _http1  # noqa: E402
from mitmproxy.proxy.layers.http._http1 import make_error_response  # noqa: E402
from mitmproxy.utils import asyncio_utils  # noqa: E402

log = logging.getLogger("capsem.dispatch")


def apply(master, *, idle_timeout: int, header_limit, on_header_refused=None) -> None:
    """Apply every patch (idempotent). `master` must have no addons yet; `header_limit()` returns
    the largest HTTP/1 request head accepted, `on_header_refused(client)` writes the audit row."""
    internals = KNOWN_VERSIONS[check_version()]
    install_dispatch(master)
    skip_message_typecheck()
    patch_http1_header_limit(header_limit, on_header_refused)
    set_idle_timeout(master, idle_timeout, internals)
    no_eager_tasks()
    cheap_task_debug_info()
    if internals.crl_points:
        drop_crl_points()


# --- 1. hook dispatch (AddonManager._iter_hooks, AddonManager._configure_all) ------------------
#
# Why: the stock manager walks every addon of the chain for every event (getattr, a context manager
# and a coroutine per addon), and every flow event is followed by an `update` event that none of
# our addons handle: ~8 events x 13 addons per HTTP request, a good part of the service's CPU per
# request. Here each event name maps to the handlers that exist, computed once (the chain is fixed
# after startup; any change clears the cache).
#
# One deliberate difference: a handler that raises during a flow event kills that flow, and one that
# raises in server_connect fails that connection (the stock manager logs and carries on, which would
# let a request or a connection pass a crashed policy check unjudged).

class CachedAddonManager(AddonManager):
    def __init__(self, master):
        super().__init__(master)
        self._handlers: dict[str, tuple] = {}

    def register(self, addon):
        self._handlers.clear()
        return super().register(addon)

    def add(self, *addons):
        super().add(*addons)
        self._handlers.clear()

    def remove(self, addon):
        super().remove(addon)
        self._handlers.clear()

    def clear(self):
        super().clear()
        self._handlers.clear()

    def _handlers_for(self, event: hooks.Hook) -> tuple:
        handlers = self._handlers.get(event.name)
        if handlers is None:
            handlers = tuple(func for top in self.chain for _, func in self._iter_hooks(top, event))
            self._handlers[event.name] = handlers
        return handlers

    async def trigger_event(self, event: hooks.Hook) -> None:
        handlers = self._handlers_for(event)
        if not handlers:
            return
        args = event.args()
        for func in handlers:
            try:
                res = func(*args)
                if res is not None and inspect.isawaitable(res):
                    await res
            except exceptions.AddonHalt:
                return
            except exceptions.OptionsError:
                raise
            except Exception:
                log.exception("addon error in %s (%s)", event.name, getattr(func, "__qualname__", func))
                for arg in args:
                    if isinstance(arg, flow.Flow) and arg.killable:
                        arg.kill()  # fail closed: never let a flow go on past a crashed check
                    elif isinstance(arg, server_hooks.ServerConnectionHookData) and arg.server.error is None:
                        # the same for a connection: a crashed server_connect check (the address
                        # checks live there) must not leave the upstream connection to be opened
                        arg.server.error = f"capsem: the {event.name} check failed"

    async def handle_lifecycle(self, event: hooks.Hook) -> None:
        await self.trigger_event(event)
        message = event.args()[0]
        if isinstance(message, flow.Flow) and self._handlers_for(hooks.UpdateHook([])):
            await self.trigger_event(hooks.UpdateHook([message]))


def install_dispatch(master) -> CachedAddonManager:
    """Swap the master's (still empty) addon manager for a CachedAddonManager."""
    if isinstance(master.addons, CachedAddonManager):
        return master.addons
    assert len(master.addons) == 0, "install the dispatcher before adding addons"
    master.options.changed.disconnect(master.addons._configure_all)
    master.addons = CachedAddonManager(master)
    return master.addons


# --- 2. http.MessageData.__post_init__ ------------------------------------------------------------

def _no_typecheck(self) -> None:
    return None


def skip_message_typecheck() -> None:
    """mitmproxy type-checks every field of every Request/Response it builds (its own `if __debug__`
    aid, ~5% of the service's CPU per request). Our messages come from mitmproxy's own parsers.
    Removes per-request work only: changes nothing of what is allowed, injected or audited
    (measured with bench/proxy.py)."""
    http.MessageData.__post_init__ = _no_typecheck


# --- 3. _http1.Http1Server.read_headers -----------------------------------------------------------

def patch_http1_header_limit(limit_getter, on_refused=None) -> None:
    """mitmproxy's HTTP/1 reader (11.0.2 and 12.x alike) buffers request heads without bound (a guest
    could exhaust host memory with one endless head). Wrap Http1Server.read_headers: if the head is still incomplete
    and the buffer holds more than the limit, answer 431 and close (and call
    on_refused(client_connection): the audit row). Idempotent."""
    if getattr(_http1.Http1Server.read_headers, "_capsem_header_limit", False):
        return
    original = _http1.Http1Server.read_headers

    def read_headers(self, event):
        yield from original(self, event)
        if (isinstance(event, events.DataReceived)
                and getattr(self.state, "__func__", None) is read_headers
                and len(self.buf) > limit_getter()):
            if on_refused is not None:
                on_refused(self.conn)
            yield commands.SendData(self.conn, make_error_response(431, "Request header fields too large"))
            yield commands.CloseConnection(self.conn)
            self.buf = _http1.ReceiveBuffer()  # free the oversized head now
            self.state = self.done
    read_headers._capsem_header_limit = True
    _http1.Http1Server.read_headers = read_headers


# --- 4. the idle timeout: mitmproxy.proxy.server.TCP_TIMEOUT (11.0.2), option tcp_timeout (12.x) ---

def set_idle_timeout(master, seconds: int, internals: Internals) -> None:
    """mitmproxy closes a connection idle for this many seconds, read when the connection starts:
    in 11.0.2 the module constant TCP_TIMEOUT (no option), in 12.x the `tcp_timeout` option. The
    service's configured idle timeout goes there (idle guest connections close)."""
    if internals.idle_timeout_option:
        master.options.update(tcp_timeout=int(seconds))
    else:
        proxy_server.TCP_TIMEOUT = int(seconds)


# --- 5. 12.x only: certs.CertStore.get_cert(crl_url=), addons.tlsconfig.TlsConfig.request --------

def drop_crl_points() -> None:
    """mitmproxy 12 copies the upstream certificate's CRL distribution point into each forged one,
    rewritten to `<upstream scheme://host>/mitmproxy-<CA serial>.crl`, and TlsConfig.request answers
    any request whose path ends that way itself (a CRL signed by our CA) instead of sending it
    upstream. 11.0.2 did neither: forged certificates carry no CRL point, and every request the policy
    allows goes upstream and is audited as such. Keep it that way: get_cert gets no crl_url, and
    TlsConfig has no request hook (a falsy attribute: the addon manager skips it). Idempotent."""
    from mitmproxy import certs
    from mitmproxy.addons import tlsconfig

    tlsconfig.TlsConfig.request = None
    if getattr(certs.CertStore.get_cert, "_capsem_no_crl", False):
        return
    original = certs.CertStore.get_cert

    def get_cert(self, commonname, sans, organization=None, crl_url=None):
        return original(self, commonname, sans, organization, None)
    get_cert._capsem_no_crl = True
    certs.CertStore.get_cert = get_cert


# --- 6. mitmproxy.utils.asyncio_utils.set_eager_task_factory (11.0.2 and 12.x) -------------------

@contextlib.contextmanager
def _lazy_tasks():
    yield


def no_eager_tasks() -> None:
    """On Python >= 3.12 Master.run installs asyncio.eager_task_factory (on 3.11 it does nothing).
    Measured in the Debian 13 root (Python 3.13, mitmproxy 11.0.2 and 12.3.1 alike): with it, a
    denied request with a large body is reset only by the 30 s header timeout after the earlier
    tests of tests/test_proxy.py ran (test_denied_large_upload_is_reset_not_buffered), without it
    at once, as on 3.11. So the service runs its tasks as on 3.11 everywhere."""
    asyncio_utils.set_eager_task_factory = _lazy_tasks


# --- 7. mitmproxy.utils.asyncio_utils.set_task_debug_info (11.0.2; 12.x already does the same) ----

def _set_task_debug_info(task, *, name: str, client: tuple | None = None) -> None:
    task.created = time.time()
    task.set_name(name)
    if client:
        task.client = client


def cheap_task_debug_info() -> None:
    """mitmproxy starts a task per hook (four per HTTP request, at least) and labels each one. In
    11.0.2 the label also looks up PYTEST_CURRENT_TEST in os.environ every time (a KeyError raised
    and caught per task); 12.x dropped that lookup. This is 12.x's function: the same labels, minus
    a test runner's name. Removes per-request work only."""
    asyncio_utils.set_task_debug_info = _set_task_debug_info
