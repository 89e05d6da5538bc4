"""Bounded log files for what a guest can make a helper print (serial console, QEMU, virtiofsd,
vhost-device-vsock).

A guest writing to its serial console as fast as it can must not fill the host's /run (a tmpfs,
i.e. host memory). So helpers never write to files: they write into a pipe, and a reader thread
copies at most `limit` bytes into the log file; the rest is counted and dropped, keeping only the
last TAIL bytes, which are appended with a note when the writer closes. The pipe is always drained,
so a helper never blocks on its log.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

DEFAULT_LIMIT = 1 << 20   # 1 MiB per log
TAIL = 16 * 1024


class CappedLog:
    def __init__(self, path: Path, limit: int = DEFAULT_LIMIT, owner: tuple[int, int] | None = None):
        self.path = Path(path)
        self.limit = limit
        self.written = 0
        self.dropped = 0
        self._tail = bytearray()
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        self._file = os.fdopen(fd, "wb", buffering=0)
        self._read_fd, self.fd = os.pipe2(os.O_CLOEXEC)
        if owner is not None:  # a helper that reopens /dev/fd/N (QEMU's -serial file:) needs access
            os.fchown(self.fd, *owner)
        self._thread = threading.Thread(target=self._copy, name=f"log:{self.path.name}", daemon=True)
        self._thread.start()

    def close_writer(self) -> None:
        """Close our copy of the write end (after the helper inherited it)."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def _copy(self) -> None:
        try:
            while data := os.read(self._read_fd, 65536):
                room = self.limit - self.written
                if room > 0:
                    self._file.write(data[:room])
                    self.written += min(room, len(data))
                    data = data[room:]
                if data:
                    self.dropped += len(data)
                    self._tail += data
                    del self._tail[:-TAIL]
            if self.dropped:
                self._file.write(f"\n[capsem: {self.dropped} more bytes dropped (log limit {self.limit} bytes); "
                                 f"the last {len(self._tail)} follow]\n".encode() + bytes(self._tail))
        except OSError:
            pass
        finally:
            os.close(self._read_fd)
            self._file.close()

    def wait(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)
