"""SHA-256 of files through an already open descriptor (so what was hashed is what gets used)."""

from __future__ import annotations

import hashlib
import os

CHUNK = 4 << 20  # large reads: hashing runs at memory/SHA-NI speed, not syscall speed


def sha256_fd(fd: int) -> tuple[str, int]:
    """Hash the whole file behind `fd` from offset 0 (with pread: the fd's offset is untouched).

    Returns (hex digest, bytes read).
    """
    h = hashlib.sha256()
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    offset = 0
    while True:
        n = os.preadv(fd, [buf], offset)
        if n == 0:
            return h.hexdigest(), offset
        h.update(view[:n])
        offset += n


def sha256_file(path) -> tuple[str, int]:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return sha256_fd(fd)
    finally:
        os.close(fd)
