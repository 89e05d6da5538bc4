"""What the warm and preinit kernel processes (warm_kernel.py, preinit_kernel.py) do first.

The agent (ipykernel_host.py) starts them as `python3 -m capsem_agent.<module>` with PYTHONPATH
set to the directory that holds capsem_agent (/opt/capsem in the guest), for that start only. The
kernel they become must not see that: `forget_launch_path` leaves sys.path and the environment as
a kernel started with `python3 -c` had them. This module and its callers import nothing but the
stdlib and ipykernel: they run in the kernel's interpreter, not the agent's.
"""

from __future__ import annotations

import os
import sys

AGENT_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # holds capsem_agent/
WARM_MARKER = b"capsem-warm-ready\n"  # written once the heavy imports are done (see ipykernel_host)


def forget_launch_path(root: str = AGENT_ROOT) -> None:
    """Drop the launch directory that `-m` puts first on sys.path (as ipykernel_launcher drops
    "": IPython's init_path puts the kernel's cwd back) and the agent's own directory, from
    sys.path and from PYTHONPATH, which the agent set only to find this package."""
    if sys.path and not sys.flags.safe_path:
        del sys.path[0]
    while root in sys.path:
        sys.path.remove(root)
    if os.environ.get("PYTHONPATH") == root:
        del os.environ["PYTHONPATH"]


def forget_agent_modules() -> None:
    """Drop capsem_agent's modules from sys.modules before notebook code runs, so that (as in a
    cold kernel) `import capsem_agent` finds nothing. The running bootstrap keeps its own."""
    for name in [n for n in list(sys.modules) if n == "capsem_agent" or n.startswith("capsem_agent.")]:
        del sys.modules[name]


class HideDebugpy:
    """A meta-path finder under which `import debugpy` (and its submodules) fails."""

    def find_spec(self, name, path=None, target=None):
        if name == "debugpy" or name.startswith("debugpy."):
            raise ImportError("debugpy is not loaded with the kernel (capsem kernels have no debugger)",
                              name=name)
        return None


def import_ipykernel_without_debugpy() -> None:
    """ipykernel imports debugpy (and through it pkg_resources) to offer its debugger: about 3 s of
    emulated CPU per kernel start here, for a debugger the capsem kernelspec turns off
    ("debugger": false). Import ipykernel with debugpy hidden (it then reports no debugger) and
    unhide it after, so notebook code can still import debugpy."""
    hide = HideDebugpy()
    sys.meta_path.insert(0, hide)
    try:
        import ipykernel.ipkernel  # noqa: F401
        import ipykernel.debugger  # noqa: F401  (the debugger module decides, once, at import)
    finally:
        sys.meta_path.remove(hide)
