"""Loads the capsem server extension: its settings (traitlets) and its /capsem/ routes.

    c.CapsemExtension.allow_policy_edits = False   # admin opt-in; see handlers.PolicyHandler.put
    c.CapsemExtension.audit_db = ""                # default: the database capsem's egress proxy writes
    c.CapsemExtension.offline_buffer_bytes = 64 << 20  # per capsem kernel with no browser connected
"""

from __future__ import annotations

from pathlib import Path

from traitlets import Bool, Float, Int, TraitError, Unicode, validate
from traitlets.config import Configurable

from capsem_vm.sweep import sweep_once

SETTINGS_KEY = "capsem_extension"


class CapsemExtension(Configurable):
    allow_policy_edits = Bool(
        False, config=True,
        help="Allow changing a kernel's egress policy through PUT /capsem/kernels/<id>/policy. Off by "
             "default: whoever holds the Jupyter token can call it, including code in the notebook.")
    audit_db = Unicode(
        "", config=True,
        help="Audit database to read network logs from (default: the provisioner's, else capsem's "
             "default audit.sqlite3 in its data dir).")
    poll_interval = Float(0.5, config=True, help="Seconds between checks for new audit rows and state changes.")
    keepalive_interval = Float(15.0, config=True, help="Seconds between keep-alive comments on the event stream.")
    max_rows = Int(500, config=True, help="At most this many network rows per response (the newest).")
    offline_buffer_bytes = Int(
        64 << 20, config=True,
        help="At most this many bytes of a capsem kernel's messages are kept in the server's memory while no "
             "browser is connected to it (jupyter_server keeps them all otherwise); past it, output is "
             "dropped and the reconnecting client is told how much (offline_buffer.py).")

    @validate("offline_buffer_bytes")
    def _positive(self, proposal):
        if proposal["value"] < 1 << 20:
            raise TraitError("offline_buffer_bytes must be at least 1 MiB (to keep nothing, set "
                             "c.MappingKernelManager.buffer_offline_messages = False)")
        return proposal["value"]

    def audit_db_path(self, provisioner=None) -> Path:
        if self.audit_db:
            return Path(self.audit_db)
        own = getattr(provisioner, "audit_db", None)
        if own:
            return Path(own)
        from capsem_vm.proxy.audit import default_db_path
        return default_db_path()


def _load_jupyter_server_extension(serverapp) -> None:
    from .handlers import routes
    sweep_once()  # what a killed server left in the runtime dir (capsem_vm/sweep.py)

    ext = CapsemExtension(parent=serverapp)
    web_app = serverapp.web_app
    web_app.settings[SETTINGS_KEY] = ext
    base_url = web_app.settings.get("base_url", "/")
    web_app.add_handlers(".*$", routes(base_url))
    from .facts import is_capsem
    from .offline_buffer import cap_offline_buffers
    cap_offline_buffers(serverapp.kernel_manager, ext.offline_buffer_bytes, is_capsem)
    serverapp.log.info("capsem: server extension loaded (policy edits from the browser %s)",
                       "ENABLED" if ext.allow_policy_edits else "disabled")
