"""Hook dispatch for the proxy service: mitmproxy's AddonManager with a per-event handler list.

Why: the stock manager walks every addon of the chain for every event (getattr, a context manager
and a coroutine per addon), and every flow event is followed by an `update` event that none of
our addons handle: ~8 events x 13 addons per HTTP request, a good part of the service's CPU per
request. Here each event name maps to the handlers that exist, computed once (the chain is fixed
after startup; any change clears the cache).

One deliberate difference: a handler that raises during a flow event kills that flow, and one that
raises in server_connect fails that connection (the stock manager logs and carries on, which would
let a request or a connection pass a crashed policy check unjudged).
"""

from __future__ import annotations

import inspect
import logging

from mitmproxy import exceptions, flow, hooks
from mitmproxy.addonmanager import AddonManager
from mitmproxy.proxy import server_hooks

log = logging.getLogger("capsem.dispatch")


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


def install(master) -> CachedAddonManager:
    """Swap the master's (still empty) addon manager for a CachedAddonManager."""
    assert len(master.addons) == 0, "install the dispatcher before adding addons"
    master.options.changed.disconnect(master.addons._configure_all)
    master.addons = CachedAddonManager(master)
    return master.addons
