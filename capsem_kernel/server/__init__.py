"""The capsem jupyter_server extension: what a capsem kernel's sandbox is doing, for JupyterLab.

Enabled by `etc/jupyter/jupyter_server_config.d/capsem_kernel.json` (installed with the package).
REST under /capsem/ (see handlers.py), configured through `c.CapsemExtension.*` (extension.py).
"""

from .extension import CapsemExtension, _load_jupyter_server_extension


def _jupyter_server_extension_points() -> list[dict]:
    return [{"module": "capsem_kernel.server"}]


__all__ = ["CapsemExtension", "_jupyter_server_extension_points", "_load_jupyter_server_extension"]
