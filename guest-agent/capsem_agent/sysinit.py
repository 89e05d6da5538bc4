"""The little a PID 1 must set up before anything else runs (only when we really are PID 1).

Each step is best effort: a missing piece is logged, never fatal, because a VM without the agent
is useless and the host will notice what does not work.
"""

from __future__ import annotations

import os
import sys

from . import mounts

INIT_TIMES = "/run/capsem/init-times"
IN_VM = False  # set by setup(): system-wide changes (network, trust store) are allowed
SIOCGIFFLAGS = 0x8913
SIOCSIFFLAGS = 0x8914
IFF_UP = 0x1

BASE_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "HOME": "/root",
    "LANG": "C.UTF-8",
}


def log(msg: str) -> None:
    try:
        sys.stderr.write(f"capsem-agent: {msg}\n")
        sys.stderr.flush()
    except (OSError, ValueError):
        pass


def loopback_up() -> None:
    """ipykernel binds 127.0.0.1: the loopback interface must be up (no iproute2 needed)."""
    import fcntl
    import socket
    import struct
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        ifr = struct.pack("16sH14x", b"lo", 0)
        flags = struct.unpack("16sH14x", fcntl.ioctl(s.fileno(), SIOCGIFFLAGS, ifr))[1]
        fcntl.ioctl(s.fileno(), SIOCSIFFLAGS, struct.pack("16sH14x", b"lo", flags | IFF_UP))


def _hostname() -> None:
    import socket
    socket.sethostname("capsem")


def _mount_if_missing(target, fstype, source, flags=0, data=None, mode=0o755):
    if mounts.is_mountpoint(target):
        return
    os.makedirs(target, mode=mode, exist_ok=True)
    mounts.mount(source, target, fstype, flags, data)


def process_defaults() -> None:
    """The per-process part of setup(): PID 1 runs it, and so does the service it forked early."""
    global IN_VM
    IN_VM = True
    os.environ.update(BASE_ENV)
    os.umask(0o022)


def setup() -> None:
    process_defaults()
    nosuid_nodev = mounts.MS_NOSUID | mounts.MS_NODEV
    steps = [
        ("proc", lambda: _mount_if_missing("/proc", "proc", "proc", nosuid_nodev | mounts.MS_NOEXEC)),
        ("sys", lambda: _mount_if_missing("/sys", "sysfs", "sysfs", nosuid_nodev | mounts.MS_NOEXEC)),
        ("dev", lambda: _mount_if_missing("/dev", "devtmpfs", "devtmpfs", mounts.MS_NOSUID, "mode=0755")),
        ("run", _mount_run),
        # sizes: tmpfs lives in guest RAM; caps keep a full /tmp an ENOSPC, not an OOM
        ("tmp", lambda: _mount_if_missing("/tmp", "tmpfs", "tmpfs", nosuid_nodev, "mode=1777,size=25%")),
        ("devpts", lambda: _mount_if_missing("/dev/pts", "devpts", "devpts",
                                             mounts.MS_NOSUID | mounts.MS_NOEXEC,
                                             "newinstance,ptmxmode=0666,mode=0620,gid=5")),
        ("shm", lambda: _mount_if_missing("/dev/shm", "tmpfs", "tmpfs", nosuid_nodev, "mode=1777,size=10%")),
        ("devlinks", _dev_links),
        ("hostname", _hostname),
        ("loopback", loopback_up),
    ]
    for name, step in steps:
        try:
            step()
        except Exception as exc:  # noqa: BLE001 - keep booting, report what failed
            log(f"setup step {name} failed: {exc}")


def _mount_run() -> None:
    """/run as tmpfs, keeping the boot timings /init left there."""
    if mounts.is_mountpoint("/run"):
        return
    try:
        with open(INIT_TIMES, "rb") as f:
            saved = f.read(4096)
    except OSError:
        saved = None
    mounts.mount("tmpfs", "/run", "tmpfs", mounts.MS_NOSUID | mounts.MS_NODEV, "mode=0755,size=10%")
    if saved is not None:
        os.makedirs(os.path.dirname(INIT_TIMES), mode=0o755, exist_ok=True)
        with open(INIT_TIMES, "wb") as f:
            f.write(saved)


def _dev_links() -> None:
    """devtmpfs lacks the /dev/fd family that shells use for process substitution."""
    for name, target in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"),
                         ("stdout", "/proc/self/fd/1"), ("stderr", "/proc/self/fd/2")):
        path = "/dev/" + name
        if not os.path.lexists(path):
            os.symlink(target, path)
    if not os.path.exists("/dev/ptmx"):
        os.symlink("pts/ptmx", "/dev/ptmx")
