"""Who could change an image after it was verified: a root capsem boots only what root alone can write.

Verification hashes the assets through the very fds QEMU then reads, but QEMU reads the rootfs
lazily for the VM's whole life: whoever can write the file (or replace the directory entries, or a
directory above them) can change what a root-started VM runs after the hash. So, when capsem runs
as root, every asset file must be root's and writable by root only, and so must the image
directory and every directory above it; an ancestor that others may write is accepted only when
sticky (like /tmp: they cannot rename or remove what is not theirs).
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import BinaryIO

from capsem_vm.errors import ImageError

HINT = ("a root capsem boots only images that root alone can change: `chown -R root:` the image and "
        "`chmod go-w` it and every directory above it, or rebuild it as root with `capsem image build`")


def _problem(st: os.stat_result, allow_sticky: bool) -> str | None:
    mode = stat.S_IMODE(st.st_mode)
    if st.st_uid != 0:
        return f"owned by uid {st.st_uid} (mode {mode:04o})"
    if mode & 0o022 and not (allow_sticky and mode & stat.S_ISVTX):
        return f"writable by {'group and others' if mode & 0o022 == 0o022 else 'group' if mode & 0o020 else 'others'} (mode {mode:04o})"
    return None


def check_root_only(image_dir: Path, files: dict[str, BinaryIO] | None = None) -> None:
    """Raise ImageError naming the first file or directory someone other than root could change.
    `files`: the opened, verified assets (checked through their fds: what QEMU will read)."""
    image_dir = Path(image_dir).resolve()
    if files is None:  # (posture report: every entry by path)
        stats = {p.name: os.lstat(p) for p in image_dir.iterdir()}
    else:
        stats = {name: os.fstat(f.fileno()) for name, f in files.items()}
    for name, st in stats.items():
        problem = _problem(st, allow_sticky=False)
        if problem:
            raise ImageError(f"refusing image {image_dir}: its {name} asset is {problem}: it could be changed "
                             "after verification, while the VM reads it", HINT)
    for d in [image_dir, *image_dir.parents]:
        problem = _problem(os.lstat(d), allow_sticky=d != image_dir)
        if problem:
            what = "the image directory" if d == image_dir else f"its ancestor {d}"
            raise ImageError(f"refusing image {image_dir}: {what} is {problem}: whoever can write it can "
                             "swap the image's files after verification", HINT)
