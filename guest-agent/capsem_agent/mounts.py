"""mount(2) through ctypes: the guest image has no need for util-linux, and a syscall has no shell."""

from __future__ import annotations

import errno
import os
import time

MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8

_libc = None


def libc():
    global _libc
    if _libc is None:
        import ctypes  # here, not at import time: the service imports this module at boot
        # not ctypes.util.find_library: it spawns ldconfig, slow under TCG and pointless here
        try:
            _libc = ctypes.CDLL("libc.so.6", use_errno=True)
        except OSError:
            _libc = ctypes.CDLL(None, use_errno=True)
        _libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p,
                                ctypes.c_ulong, ctypes.c_char_p]
    return _libc


def mount(source: str, target: str, fstype: str, flags: int = 0, data: str | None = None) -> None:
    rc = libc().mount(source.encode(), target.encode(), fstype.encode(), flags,
                      data.encode() if data is not None else None)
    if rc != 0:
        import ctypes
        err = ctypes.get_errno()
        raise OSError(err, f"mount {fstype} {source} on {target}: {os.strerror(err)}")


def is_mountpoint(path: str) -> bool:
    try:
        return os.path.ismount(path)
    except OSError:
        return False


def mount_virtiofs(tag: str, path: str, readonly: bool = False) -> None:
    """Mount a VirtioFS share. nosuid/nodev: the share's owner (the host user) is not trusted either."""
    os.makedirs(path, mode=0o755, exist_ok=True)
    flags = MS_NOSUID | MS_NODEV | (MS_RDONLY if readonly else 0)
    mount(tag, path, "virtiofs", flags)


VIRTIOFS_DEVICES = "/sys/bus/virtio/drivers/virtiofs"
NOT_THERE_YET = (errno.EINVAL, errno.ENOENT, errno.ENODEV)  # virtiofs: "tag <...> not found" is EINVAL


def _bound_virtiofs_devices() -> frozenset[str]:
    try:
        return frozenset(n for n in os.listdir(VIRTIOFS_DEVICES) if n.startswith("virtio"))
    except OSError:
        return frozenset()


PROBE_RETRY = 0.05  # s between tries while a device is bound (see below)


def mount_virtiofs_when_present(tag: str, path: str, readonly: bool, wait: float,
                                poll: float = 0.01) -> None:
    """mount_virtiofs for a device that is being hot-plugged: retry whenever the set of devices
    bound to the virtiofs driver changes (a stat-like poll of sysfs, no kernel log line per try),
    for at most `wait` seconds. Waiting here rather than in the host's retries saves their
    round trips and sleeps (~0.1 s of a warm start). The driver core links a device into the
    driver's directory before the driver's probe has registered its tag, so while a device is
    bound the mount is also retried every PROBE_RETRY (seen: the link there, the mount failing
    with "tag not found", and no further change for the 20 s the host allowed)."""
    deadline = time.monotonic() + wait
    seen = _bound_virtiofs_devices()
    while True:
        try:
            mount_virtiofs(tag, path, readonly)
            return
        except OSError as exc:
            if exc.errno not in NOT_THERE_YET or time.monotonic() >= deadline:
                raise
        retry_at = min(deadline, time.monotonic() + PROBE_RETRY) if seen else deadline
        while (current := _bound_virtiofs_devices()) == seen and time.monotonic() < retry_at:
            time.sleep(poll)
        seen = current
