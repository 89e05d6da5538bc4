"""Open an image's assets and verify them through the very fds handed to QEMU.

Every byte is hashed every time (no mtime shortcut): the fd that was hashed is the fd QEMU reads
(as /dev/fd/N), so replacing a file after verification has no effect on the VM.
"""

from __future__ import annotations

import hashlib
import os
import stat
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from capsem_vm.errors import AssetVerificationError, ImageError

from .hashing import sha256_fd
from .manifest import ASSET_FILES, MANIFEST_NAME, MAX_MANIFEST_BYTES, parse_manifest


@dataclass
class AssetCheck:
    """The outcome of checking one asset (used by `capsem image verify/info`)."""

    name: str
    path: Path
    expected_sha256: str
    expected_size: int
    actual_sha256: str | None = None
    actual_size: int | None = None
    seconds: float = 0.0
    error: str | None = None

    @property
    def ok(self) -> bool:
        return (self.error is None and self.actual_sha256 == self.expected_sha256
                and self.actual_size == self.expected_size)

    def problem(self) -> str:
        if self.error:
            return self.error
        if self.actual_size != self.expected_size:
            return f"size {self.actual_size} != expected {self.expected_size}"
        return f"sha256 {self.actual_sha256} != expected {self.expected_sha256}"


@dataclass
class VerifiedImage:
    """Verified, open assets. Use as a context manager; the files close on exit."""

    dir: Path
    manifest: dict
    digest: str  # sha256 of manifest.json: the image's identity
    kernel: BinaryIO
    initrd: BinaryIO
    rootfs: BinaryIO
    paths: dict[str, Path]
    checks: list[AssetCheck] = field(default_factory=list)
    manifest_bytes: bytes = b""  # exactly the bytes `digest` was computed over (what export signs)

    def close(self) -> None:
        for f in (self.kernel, self.initrd, self.rootfs):
            f.close()

    def __enter__(self) -> "VerifiedImage":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _open_regular(path: Path) -> BinaryIO:
    """Open read-only, refusing symlinks and non-regular files (a FIFO or device could lie)."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise ImageError(f"{path} is not a regular file", "rebuild the image with `capsem image build`")
    return os.fdopen(fd, "rb", buffering=0)


def read_manifest(image_dir: Path) -> tuple[dict, str]:
    """(manifest, sha256 of its bytes) read through one fd."""
    manifest, data = read_manifest_bytes(image_dir)
    return manifest, hashlib.sha256(data).hexdigest()


def read_manifest_bytes(image_dir: Path) -> tuple[dict, bytes]:
    """(manifest, its exact bytes) read through one fd."""
    path = Path(image_dir) / MANIFEST_NAME
    try:
        with _open_regular(path) as f:
            data = f.read(MAX_MANIFEST_BYTES + 1)
    except FileNotFoundError:
        raise ImageError(f"image {image_dir} has no {MANIFEST_NAME}",
                         "the image is incomplete: rebuild it with `capsem image build`")
    except OSError as e:
        raise ImageError(f"cannot read {path}: {e}", "rebuild the image with `capsem image build`")
    return parse_manifest(data, path), data


def check_asset(name: str, f: BinaryIO | None, path: Path, entry: dict) -> AssetCheck:
    check = AssetCheck(name, path, entry["sha256"], entry["size"])
    if f is None:
        check.error = "missing"
        return check
    start = time.perf_counter()
    check.actual_sha256, check.actual_size = sha256_fd(f.fileno())
    check.seconds = time.perf_counter() - start
    return check


@dataclass
class ImageCheck:
    """Result of check_image: every asset checked. The caller owns (and must close) `files`."""

    manifest: dict
    manifest_bytes: bytes
    digest: str
    checks: list[AssetCheck]
    files: dict[str, BinaryIO]

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    def close(self) -> None:
        for f in self.files.values():
            f.close()


def check_image(image_dir: Path) -> ImageCheck:
    """Check every asset (not stopping at the first failure), hashing through the opened fds."""
    image_dir = Path(image_dir)
    manifest, data = read_manifest_bytes(image_dir)
    files: dict[str, BinaryIO] = {}
    checks = []
    for name, entry in manifest["assets"].items():
        path = image_dir / entry["file"]
        try:
            files[name] = _open_regular(path)
        except (OSError, ImageError) as e:
            check = AssetCheck(name, path, entry["sha256"], entry["size"])
            check.error = "missing" if isinstance(e, FileNotFoundError) else str(e)
            checks.append(check)
            continue
        checks.append(check_asset(name, files[name], path, entry))
    return ImageCheck(manifest, data, hashlib.sha256(data).hexdigest(), checks, files)


def open_verified(image_dir: Path) -> VerifiedImage:
    """Open and fully verify an image. Raises ImageError / AssetVerificationError on any problem."""
    image_dir = Path(image_dir)
    result = check_image(image_dir)
    failed = [c for c in result.checks if not c.ok]
    if failed:
        result.close()
        c = failed[0]
        if c.error:
            raise ImageError(f"VM asset {c.name!r} ({c.path}) is unusable: {c.error}",
                             "rebuild the image with `capsem image build` or re-import a trusted copy")
        raise AssetVerificationError(
            f"{c.name} ({c.path})", f"{c.expected_sha256} ({c.expected_size} bytes)",
            f"{c.actual_sha256} ({c.actual_size} bytes)")
    files = result.files
    return VerifiedImage(
        dir=image_dir, manifest=result.manifest, digest=result.digest,
        kernel=files["kernel"], initrd=files["initrd"], rootfs=files["rootfs"],
        paths={name: image_dir / ASSET_FILES[name] for name in ASSET_FILES}, checks=result.checks,
        manifest_bytes=result.manifest_bytes,
    )
