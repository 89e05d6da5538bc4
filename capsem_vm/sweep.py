"""The start-up sweep: remove what a killed capsem owner (a SIGKILLed Jupyter server or provisioner
process, `capsem vm run`, a pool) left in this user's runtime dir. Called once per process, from
the server extension's load and from the provisioner's first use (`sweep_once()`).

Nothing of a killed owner normally outlives it by more than a moment: its helpers die with it
(process.py: PR_SET_PDEATHSIG from the one spawner thread; QEMU's confinement wrapper kills QEMU
when it dies, `unshare --kill-child`; the proxy service has PDEATHSIG and stdin EOF; a claimed
pooled VM's keeper tears the VM down when the owner socket closes). What stays is files: the VM
dirs (sockets, logs, pid files). The sweep removes them and, should a helper have survived
anyway, kills it, only where that is provably ours:

- a VM dir is stale when its `owner` file (pid and start time, written by us, believed only if
  we own it: runtime.py) names a process that is gone; a live owner's VM (another Jupyter server,
  a pool keeper, `capsem vm run`) is never touched;
- a helper recorded in a stale dir is killed only if that pid still has the start time recorded
  for it (a pid reused by an unrelated process has another one): runtime.sweep_stale;
- the pool's socket and pid file are removed only when no pool answers on the socket and the
  recorded pool process (pid and start time) is gone;
- the egress proxy service's logs (`proxy-<pid>.log`, one per owning process) of owners that are
  gone: the newest KEEP_PROXY_LOGS of them stay for a post-mortem, older ones go (each Jupyter
  server start used to add one for good).
"""

from __future__ import annotations

import logging
import os
import re
import socket
import stat
import threading

from . import paths, runtime

log = logging.getLogger(__name__)
SETTLE_S = 60.0  # a pool socket younger than this may belong to a pool that is just starting
KEEP_PROXY_LOGS = 10  # logs of gone proxy owners kept for a post-mortem
_PROXY_LOG = re.compile(r"proxy-([0-9]{1,10})\.log")

_lock = threading.Lock()
_swept = False  # process-wide by necessity: the extension and every provisioner ask; one sweep does


def sweep_once() -> None:
    """The first call in this process sweeps; later ones return at once. Never raises (a sweep that
    fails must not stop a server from loading or a kernel from starting): it logs why."""
    global _swept
    with _lock:
        if _swept:
            return
        _swept = True
        try:
            sweep()
        except Exception as exc:  # noqa: BLE001 - see above
            log.warning("capsem: sweeping the runtime dir failed: %s", exc)


def sweep() -> dict[str, int]:
    """Sweep now; returns what was removed."""
    swept = {"vm_dirs": runtime.sweep_stale(), "pool_files": sweep_pool_files(),
             "proxy_logs": sweep_proxy_logs()}
    if any(swept.values()):
        log.info("capsem: removed what a killed capsem left behind: %s", swept)
    return swept


def sweep_pool_files() -> int:
    """pool.sock and pool.pid of a pool that is gone (pool/service.py writes them)."""
    pool = paths.runtime_dir() / "pool"
    sock, pid_file = pool / "pool.sock", pool / "pool.pid"
    if not sock.exists() or _answers(sock):
        return 0
    recorded = runtime._read_pairs(pid_file)
    if recorded and runtime._alive(*recorded[0]):
        return 0  # the pool lives (busy, or starting): its files are its own
    if not recorded and runtime._age(sock) < SETTLE_S:
        return 0
    removed = 0
    for p in (sock, pid_file):
        try:
            p.unlink()
            removed += 1
        except FileNotFoundError:
            pass
    return removed


def sweep_proxy_logs(keep: int = KEEP_PROXY_LOGS) -> int:
    """proxy-<pid>.log files whose pid is gone, beyond the newest `keep` of them. Only regular files
    of ours with one link (never through a symlink a guest-facing helper could have planted)."""
    root = paths.runtime_dir()
    dead = []
    try:
        names = os.listdir(root)
    except OSError:
        return 0
    for name in names:
        m = _PROXY_LOG.fullmatch(name)
        if not m or _pid_exists(int(m.group(1))):
            continue
        try:
            st = os.lstat(root / name)
        except OSError:
            continue
        if stat.S_ISREG(st.st_mode) and st.st_uid == os.geteuid() and st.st_nlink == 1:
            dead.append((st.st_mtime, name))
    removed = 0
    for _, name in sorted(dead, reverse=True)[keep:]:
        try:
            os.unlink(root / name)
            removed += 1
        except FileNotFoundError:
            pass
    return removed


def _pid_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return pid > 0


def _answers(path) -> bool:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    s.settimeout(2)
    try:
        s.connect(str(path))
        return True
    except OSError:
        return False
    finally:
        s.close()

