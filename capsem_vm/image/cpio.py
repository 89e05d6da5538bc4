"""A minimal newc (SVR4, no CRC) cpio writer: the format the kernel unpacks as initramfs.

Written here rather than with cpio(1) so that the archive is reproducible (sorted, mtime 0,
owned by root) and can contain /dev/console without root privileges.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import BinaryIO


class NewcWriter:
    def __init__(self, out: BinaryIO):
        self.out = out
        self.ino = 1

    def _entry(self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)):
        encoded = name.encode() + b"\0"
        fields = [self.ino, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1], len(encoded), 0]
        self.ino += 1
        header = b"070701" + b"".join(b"%08X" % f for f in fields)
        self.out.write(header + encoded + b"\0" * (-(len(header) + len(encoded)) % 4))
        self.out.write(data + b"\0" * (-len(data) % 4))

    def directory(self, name: str, perm: int = 0o755):
        self._entry(name, stat.S_IFDIR | perm)

    def file(self, name: str, data: bytes, perm: int = 0o644):
        self._entry(name, stat.S_IFREG | perm, data)

    def symlink(self, name: str, target: str):
        self._entry(name, stat.S_IFLNK | 0o777, target.encode())

    def char_device(self, name: str, major: int, minor: int, perm: int = 0o600):
        self._entry(name, stat.S_IFCHR | perm, rdev=(major, minor))

    def tree(self, src: Path, dest: str):
        """Add a host directory's contents below `dest` (dirs, files, symlinks), sorted."""
        for root, dirs, files in os.walk(src):
            dirs[:] = sorted(d for d in dirs if d != "__pycache__")
            rel = os.path.relpath(root, src)
            base = dest if rel == "." else f"{dest}/{rel}"
            if rel != ".":
                self.directory(base)
            for f in sorted(files):
                if f.endswith(".pyc"):
                    continue
                path = Path(root) / f
                st = path.lstat()
                if stat.S_ISLNK(st.st_mode):
                    self.symlink(f"{base}/{f}", os.readlink(path))
                elif stat.S_ISREG(st.st_mode):
                    self.file(f"{base}/{f}", path.read_bytes(), stat.S_IMODE(st.st_mode))

    def close(self):
        self._entry("TRAILER!!!", 0)
        pad = -self.out.tell() % 512 if self.out.seekable() else 0
        self.out.write(b"\0" * pad)
