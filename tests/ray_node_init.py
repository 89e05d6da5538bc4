"""PID 1 of one Ray worker node of tests/ray_world.py (no tests here).

Runs inside the node's own network, mount, UTS and PID namespaces (ray_world starts it with
`ip netns exec NS unshare --mount --uts --pid --fork --mount-proc`). It gives the node what a
separate machine would have: its own /tmp, /dev/shm and /run (tmpfs), its own hostname, the
notebook folders it must not see covered by an empty tmpfs; then it starts the raylet
(`ray start ... --block`) and reaps every process of the node until the raylet exits.

Killing this process (SIGKILL, from outside) makes the kernel SIGKILL every other process of the
node at once: that is the harness's node kill. SIGTERM is a clean stop: it is passed to
`ray start --block`, which stops the node's Ray processes.

argv[1]: JSON {"hostname", "hide": [paths], "keep": [paths], "argv": [ray start ...], "env": {...}}
("keep": dirs under /tmp, /dev/shm or /run the node must still see: the checkout and its venv)
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys


def _mount_tmpfs(path: str, size: str = "2g") -> None:
    os.makedirs(path, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=1777", "tmpfs", path], check=True)


def main() -> int:
    spec = json.loads(sys.argv[1])
    socket.sethostname(spec["hostname"])
    private = ("/tmp", "/dev/shm", "/run")
    # what the node must still see although it lives under a dir made private here (a checkout and
    # its venv cloned under /tmp, as a CI run may): held by fd across the tmpfs mount, bound back
    keep = {p: os.open(p, os.O_PATH | os.O_DIRECTORY) for p in spec.get("keep", [])
            if os.path.isdir(p) and any(p == d or p.startswith(d + "/") for d in private)}
    for path in private:
        _mount_tmpfs(path)
    for path, fd in keep.items():
        os.makedirs(path, exist_ok=True)
        # --no-canonicalize: mount(8) would resolve the fd link to its path, now the empty tmpfs dir
        subprocess.run(["mount", "--no-canonicalize", "--bind", f"/proc/self/fd/{fd}", path], check=True,
                       pass_fds=(fd,))
        os.close(fd)
    for path in spec.get("hide", []):
        if os.path.isdir(path):
            subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,mode=0755", "tmpfs", path], check=True)
    env = dict(os.environ)
    env.update(spec.get("env", {}))
    for key in ("CAPSEM_RUNTIME_DIR", "CAPSEM_DATA_DIR"):
        if env.get(key):
            os.makedirs(env[key], mode=0o700, exist_ok=True)
    child = subprocess.Popen(spec["argv"], env=env, cwd=spec.get("cwd") or "/")
    signal.signal(signal.SIGTERM, lambda *_: child.send_signal(signal.SIGTERM))
    signal.signal(signal.SIGINT, lambda *_: child.send_signal(signal.SIGTERM))
    code = 1
    while True:  # PID 1 reaps every orphan of the node, not only its own child
        try:
            pid, status = os.waitpid(-1, 0)
        except ChildProcessError:
            break
        except InterruptedError:
            continue
        if pid == child.pid:
            code = os.waitstatus_to_exitcode(status)
            break
    return code  # our exit takes the rest of the node with it (PID namespace)


if __name__ == "__main__":
    sys.exit(main())
