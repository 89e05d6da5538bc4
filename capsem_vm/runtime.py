"""Per-VM runtime directories (mode 0700) and the sweep of ones left by a killed owner."""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import signal
import time
from pathlib import Path

from . import paths
from .config import RuntimePaths

log = logging.getLogger(__name__)
PREFIX = "vm-"


def create_vm_dir() -> RuntimePaths:
    root = paths.runtime_dir() / f"{PREFIX}{secrets.token_hex(4)}"
    root.mkdir(mode=0o700)
    rp = RuntimePaths(root)
    rp.owner.write_text(f"{os.getpid()} {_start_time(os.getpid())}\n")
    return rp


def record_pids(rp: RuntimePaths, procs) -> None:
    rp.pids.write_text("".join(f"{p.pid} {_start_time(p.pid)}\n" for p in procs))


def remove_vm_dir(rp: RuntimePaths) -> None:
    shutil.rmtree(rp.root, ignore_errors=True)


def _start_time(pid: int) -> str:
    """Process start time in clock ticks: tells a live pid apart from a recycled one."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


def _alive(pid: int, start: str) -> bool:
    return bool(start) and _start_time(pid) == start


def _age(path: Path) -> float:
    try:
        return time.time() - path.stat().st_mtime
    except OSError:
        return 0.0


def _read_pairs(path: Path) -> list[tuple[int, str]]:
    pairs = []
    try:
        for line in path.read_text().splitlines():
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
            if _alive(pid, start):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        log.info("removing stale VM dir %s", d)
        remove_vm_dir(rp)
        swept += 1
    return swept
