"""The warm kernel process: `python3 -m capsem_agent.warm_kernel` (started by ipykernel_host).

It imports everything heavy, writes the marker, then waits for one JSON line of parameters on
stdin (connection file, cwd, env, uid, gid) and becomes the kernel, as `ipykernel_launcher -f`.
"""

from __future__ import annotations

import json
import os
import sys

from .kernel_boot import WARM_MARKER, forget_agent_modules, forget_launch_path, import_ipykernel_without_debugpy

MAX_PARAMS = 1 << 20


def become_kernel(params: dict) -> None:
    """Take the kernel's identity: stdin from /dev/null, its credentials, cwd, env and argv."""
    fd = os.open(os.devnull, os.O_RDONLY)
    os.dup2(fd, 0)
    os.close(fd)
    if params.get("gid") is not None:
        os.setgroups([])
        os.setgid(params["gid"])
    if params.get("uid") is not None:
        os.setuid(params["uid"])
    os.chdir(params["cwd"])
    os.environ.clear()
    os.environ.update(params["env"])
    sys.argv = ["ipykernel_launcher", "-f", params["connection_file"]]


def main() -> None:
    forget_launch_path()
    import_ipykernel_without_debugpy()
    from ipykernel import kernelapp
    import ipykernel.ipkernel  # noqa: F401
    import ipykernel.zmqshell  # noqa: F401
    import IPython.core.interactiveshell  # noqa: F401
    os.write(1, WARM_MARKER)
    line = sys.stdin.buffer.readline(MAX_PARAMS)
    if not line:
        os._exit(0)
    become_kernel(json.loads(line))
    forget_agent_modules()
    kernelapp.launch_new_instance()


if __name__ == "__main__":
    main()
