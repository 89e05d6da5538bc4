"""Claims before refills: boots under way wait while a just-claimed kernel starts.

Under TCG a booting VM keeps a host core busy for tens of seconds. A kernel claimed from the pool
needs the host for about a second (folder attached, first messages through the channel relay);
with two boots running beside it on a 2-core host that second doubled. So after a claim the pool
stops (SIGSTOP) the process trees of the VMs still booting and continues them (SIGCONT) a few
seconds later; each further claim moves the end of the pause. Signals go through pidfds, so a
process that ended meanwhile cannot be confused with a new one that got its pid.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path

PAUSE_S = 3.0


def descendants(pid: int) -> list[int]:
    """pid's children, grandchildren, ... (from /proc; processes that vanish meanwhile are skipped)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), ()):
            out.append(child)
            todo.append(child)
    return out


class BootPause:
    def __init__(self, seconds: float = PAUSE_S):
        self.seconds = seconds
        self.until = 0.0
        self._stopped: dict[int, int] = {}  # pid -> pidfd
        self._roots: set[int] = set()  # those with at least one process stopped under them

    @property
    def paused(self) -> list[int]:
        return sorted(self._stopped)

    def holds(self, root: int) -> bool:
        """The tree under `root` is stopped now (for status)."""
        return root in self._roots

    def remaining_s(self) -> float:
        """Seconds until the stopped trees continue (0 when none are stopped)."""
        return max(0.0, self.until - time.monotonic()) if self._stopped else 0.0

    def pause(self, roots: list[int]) -> None:
        """Stop the trees under `roots` (the roots themselves, the keepers, keep running: they only
        wait) until `seconds` from now; call resume_if_due() after that."""
        self.until = time.monotonic() + self.seconds
        for root in roots:
            for pid in descendants(root):
                if pid in self._stopped:
                    continue
                try:
                    fd = os.pidfd_open(pid)
                except OSError:
                    continue
                try:
                    signal.pidfd_send_signal(fd, signal.SIGSTOP)
                except OSError:
                    os.close(fd)
                    continue
                self._stopped[pid] = fd
                self._roots.add(root)

    def resume_if_due(self) -> bool:
        if time.monotonic() < self.until:
            return False
        self.resume()
        return True

    def resume(self) -> None:
        stopped, self._stopped = self._stopped, {}
        self._roots = set()
        for fd in stopped.values():
            with contextlib.suppress(OSError):
                signal.pidfd_send_signal(fd, signal.SIGCONT)
            os.close(fd)
