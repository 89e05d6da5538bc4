"""A normal user's QEMU and vhost-device-vsock in namespaces of their own.

A root capsem gives each VM's QEMU and vsock backend a uid of their own (privsep.py): they cannot
signal or ptrace the user's other processes, nor read the user's files. A capsem started by a
normal user has no other uid to give, so it gives them what the kernel allows an unprivileged
user instead, via `unshare` (util-linux):

- a user namespace (the user is its root; the helper itself runs with no capabilities at all:
  setpriv empties the bounding set before exec, so it cannot undo the mounts below);
- a pid namespace with its own /proc: the user's other processes (their Jupyter server, shell,
  SSH agent) cannot be seen, signalled or ptraced, however the helper is subverted;
- a network namespace (loopback only; QEMU has no NIC and vhost-user sockets are path names, which
  work across network namespaces) and its own IPC and UTS namespaces: no abstract Unix sockets
  (session bus, X11), no SysV IPC of the user's session;
- a mount namespace where the user's home, /run/user/UID (session bus, agent sockets), /tmp,
  /var/tmp and /dev/shm are empty tmpfs, with only the VM's own directory put back (bound through
  an fd opened before the hiding): what the helper needs from the host reaches it as fds or lives
  in that directory.

QEMU keeps its own -sandbox seccomp filter on top; vhost-device-vsock gets seccomp.VSOCK_RULES,
installed last, after unshare/mount/setpriv (which the filter refuses), by `python -I seccomp.py`.

unshare --fork keeps the parent (the process capsem manages) outside and does not pass SIGTERM
on: a confined helper is stopped with SIGKILL, which --kill-child passes on (the guest state is in
memory: nothing to flush).
"""

from __future__ import annotations

import os
import pwd
import signal
from pathlib import Path

from . import helpers

STOP_SIGNAL = signal.SIGKILL

# Runs as root of the new namespaces: hide the directories given before "--" under empty tmpfs,
# put the VM dir back when it was under one of them (bound through fd 3, opened before the
# hiding), then become the helper.
_SCRIPT = r'''vmdir=$1; rebind=$2; shift 2
exec 3<"$vmdir" || exit 1
while [ "$1" != "--" ]; do
  mount -t tmpfs -o mode=0755,size=64k,nr_inodes=64,nosuid,nodev,noexec capsem-hidden "$1" || exit 1; shift
done; shift
if [ "$rebind" = 1 ]; then
  mkdir -p "$vmdir" && mount --no-canonicalize --bind /proc/self/fd/3 "$vmdir" || exit 1
fi
exec 3<&-
cd "$vmdir" || exit 1
exec "$@"'''

_NEEDED = ("/usr", "/etc", "/bin", "/sbin", "/lib", "/lib64", "/proc", "/sys", "/dev", "/run")


def hidden_dirs(needed: list[str], uid: int | None = None) -> list[str]:
    """What a confined helper must not see: the user's home and session dirs and shared temp dirs;
    never one holding something the helper needs (`needed`: its program; and the system dirs)."""
    uid = os.geteuid() if uid is None else uid
    try:
        home = pwd.getpwuid(uid).pw_dir
    except KeyError:
        home = ""
    out: list[str] = []
    for c in (home, os.environ.get("HOME", ""), f"/run/user/{uid}", "/tmp", "/var/tmp", "/dev/shm"):
        try:
            p = Path(c).resolve(strict=True) if c else None
        except OSError:
            continue
        if p is None or not p.is_dir() or str(p) in out:
            continue
        if any(p == Path(n) or p in Path(n).resolve().parents or p in Path(n).absolute().parents
               for n in (*_NEEDED, *needed)):
            continue
        out.append(str(p))
    return out


def wrap(argv: list[str], vm_dir: os.PathLike | str, needed: list[str] = ()) -> list[str]:
    """argv of a helper run confined (see the module's doc); its cwd becomes the VM dir. `needed`:
    further files it runs (e.g. seccomp.py, the launcher installing its filter), kept visible."""
    vm_dir = Path(vm_dir).resolve()
    hidden = hidden_dirs([argv[0], *needed])
    rebind = any(Path(h) in vm_dir.parents or Path(h) == vm_dir for h in hidden)
    return [str(helpers.unshare().path), "--map-root-user", "--mount", "--propagation", "private", "--pid",
            "--fork", "--kill-child", "--mount-proc", "--net", "--ipc", "--uts", "--",
            "sh", "-c", _SCRIPT, "sh", str(vm_dir), "1" if rebind else "0", *hidden, "--",
            str(helpers.setpriv().path), "--bounding-set=-all", "--inh-caps=-all", "--ambient-caps=-all", "--",
            *argv]


def program_pid(pid: int) -> int:
    """The confined program's pid (what status and memory figures are about): the child of the
    `unshare --fork` process `pid`; `pid` itself when it is not such a wrapper (or it is gone)."""
    try:
        if os.path.basename(Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0", 1)[0].decode()) != "unshare":
            return pid
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        return int(children[0]) if len(children) == 1 else pid
    except (OSError, ValueError, IndexError, UnicodeDecodeError):
        return pid
