"""Per-VM runtime directories (mode 0700) and the sweep of ones left by a killed owner.

When capsem runs as root, a VM dir belongs to that VM's unprivileged helper uid (privsep.py), so
the helpers can create their sockets there. Root then never trusts what is in it: the `owner` and
`pids` files are only believed when root owns them (a helper cannot create root-owned files nor,
with fs.protected_hardlinks, hard-link them), and are opened without following symlinks.
"""

from __future__ import annotations

import errno
import logging
import os
import secrets
import shutil
import signal
import stat
import time
from pathlib import Path

from . import nofollow, paths
from .config import RuntimePaths
from .errors import VMError

log = logging.getLogger(__name__)
PREFIX = "vm-"


def create_vm_dir() -> RuntimePaths:
    base = paths.runtime_dir()
    root = base / f"{PREFIX}{secrets.token_hex(4)}"
    try:
        root.mkdir(mode=0o700)
        rp = RuntimePaths(root)
        rp.owner.write_text(f"{os.getpid()} {_start_time(os.getpid())}\n")
    except OSError as exc:
        shutil.rmtree(root, ignore_errors=True)  # why: a dir without its owner file would wait for a sweep
        raise VMError(f"cannot create the VM's runtime directory in {base}: {exc.strerror or exc}",
                      runtime_dir_hint(exc, base)) from None
    return rp


def runtime_dir_hint(exc: OSError, base: Path) -> str:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return (f"the file system of {base} is full (VM sockets, logs and pid files live there): free space "
                "on it, or point CAPSEM_RUNTIME_DIR at another private directory")
    return f"check {base} (it must be a private directory of yours), or point CAPSEM_RUNTIME_DIR elsewhere"


def give_to(rp: RuntimePaths, uid: int, gid: int) -> None:
    """Hand the VM dir (still 0700) to the helpers' uid. `owner` stays root's."""
    nofollow.chown(rp.root, uid, gid)


def record_pids(rp: RuntimePaths, procs) -> None:
    data = "".join(f"{p.pid} {_start_time(p.pid)}\n" for p in procs).encode()
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
    for _ in range(2):
        try:
            fd = os.open(rp.pids, flags, 0o600)
        except FileExistsError:  # not ours (a helper planted it): never write through it
            try:
                os.unlink(rp.pids)
            except OSError:
                pass
            continue
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        return
    log.warning("could not record helper pids in %s", rp.root)


def remove_vm_dir(rp: RuntimePaths) -> None:
    shutil.rmtree(rp.root, ignore_errors=True)


def _start_time(pid: int) -> str:
    """Process start time in clock ticks: tells a live pid apart from a recycled one."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
        return text.rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


def _alive(pid: int, start: str) -> bool:
    return bool(start) and _start_time(pid) == start


def kill_if_same(pid: int, start: str) -> bool:
    """SIGKILL pid only if it is still the process that started at `start`. The pidfd is opened
    before the start time is checked, so a pid recycled after the check cannot be hit."""
    if not start:
        return False
    try:
        fd = os.pidfd_open(pid)
    except OSError:  # gone (ESRCH)
        return False
    try:
        if _start_time(pid) != start:
            return False
        signal.pidfd_send_signal(fd, signal.SIGKILL)
        return True
    except ProcessLookupError:
        return False
    finally:
        os.close(fd)


def _age(path: Path) -> float:
    try:
        return time.time() - path.stat().st_mtime
    except OSError:
        return 0.0


def read_trusted(path: Path, limit: int = 65536, tail: bool = False) -> str | None:
    """Text of a file only we could have written: regular, ours, one link, not a symlink.
    At most `limit` bytes: the first ones, or the last ones with tail=True."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid() or st.st_nlink != 1:
            return None
        if tail and st.st_size > limit:
            os.lseek(fd, st.st_size - limit, os.SEEK_SET)
        return os.read(fd, limit).decode(errors="replace")
    finally:
        os.close(fd)


def _read_pairs(path: Path) -> list[tuple[int, str]]:
    pairs = []
    text = read_trusted(path)
    if text is None:
        return pairs
    try:
        for line in text.splitlines():
            pid, _, start = line.partition(" ")
            if pid.isdigit():
                pairs.append((int(pid), start.strip()))
    except OSError:
        pass
    return pairs


def sweep_stale() -> int:
    """Remove VM dirs whose owner is gone, killing any helper still running. Returns how many."""
    swept = 0
    root = paths.runtime_dir()
    for d in root.glob(f"{PREFIX}*"):
        rp = RuntimePaths(d)
        owner = _read_pairs(rp.owner)
        if owner and _alive(*owner[0]):
            continue
        if not owner and _age(d) < 60:  # another process may be creating it right now
            continue
        for pid, start in _read_pairs(rp.pids):
            kill_if_same(pid, start)
        log.info("removing stale VM dir %s", d)
        remove_vm_dir(rp)
        swept += 1
    return swept
