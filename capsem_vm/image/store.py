"""Where images and their build layers live, and how they are installed atomically.

    cache_dir()/layers/<kind>/<key>/   one built asset layer (kernel, rootfs, initramfs)
    cache_dir()/images/<name>/         vmlinuz, initrd.img, rootfs.erofs (hard links), manifest.json
    cache_dir()/images/default         symlink to the image of the default recipe

Everything is built in a temp dir next to its destination and renamed into place, so an
interrupted build never leaves something that looks complete.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path

from capsem_vm import nofollow, paths
from capsem_vm.errors import ImageError

from .manifest import MANIFEST_NAME

DEFAULT = "default"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def images_dir() -> Path:
    return paths.cache_dir() / "images"


def layers_dir(kind: str) -> Path:
    return paths.cache_dir() / "layers" / kind


def layer_candidates(kind: str, key: str) -> list[Path]:
    """Where a built layer may already be: this user's cache, then (read only) the one root built
    for everyone, so a normal user's build reuses the system's kernel and rootfs instead of
    downloading and building them again (the assets are hashed into the user's own manifest)."""
    return list(dict.fromkeys((layers_dir(kind) / key, paths.system_cache_dir() / "layers" / kind / key)))


def check_name(name: str) -> str:
    if not _NAME.match(name):
        raise ImageError(f"invalid image name {name!r}",
                         "use letters, digits, '.', '_' and '-' (not starting with '.' or '-')")
    return name


def default_image_dir() -> Path:
    """The image built from the default recipe: the user's own, else the one root built for all.

    Raises ImageError if there is none."""
    searched = []
    for root in dict.fromkeys((images_dir(), paths.system_cache_dir() / "images")):
        link = root / DEFAULT
        target = link.resolve() if link.is_symlink() else link
        if (target / MANIFEST_NAME).is_file():
            return target
        searched.append(str(root))
    raise ImageError(f"no default VM image in {' or '.join(searched)}", "run `capsem image build`")


def resolve_image(name_or_path: str | None) -> Path:
    """None or "default" -> the default image; a path (contains '/', or an existing directory)
    -> that directory; otherwise a name in the image store."""
    if name_or_path is None or name_or_path == DEFAULT:
        return default_image_dir()
    if "/" in name_or_path or name_or_path in (".", ".."):
        path = Path(name_or_path).expanduser()
    else:
        path = images_dir() / check_name(name_or_path)
    if not (path / MANIFEST_NAME).is_file():
        known = ", ".join(list_images()) or "none"
        raise ImageError(f"no VM image at {path}",
                         f"run `capsem image build`, or pass one of the stored images: {known}")
    return path.resolve()


def list_images() -> list[str]:
    root = images_dir()
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir()
                  if not p.name.startswith(".") and (p / MANIFEST_NAME).is_file())


def new_temp_dir(parent: Path, prefix: str) -> Path:
    """A private temp dir beside the final destination (same filesystem: rename is atomic)."""
    parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".tmp-{prefix}-", dir=parent))


def fsync_dir_tree(path: Path) -> None:
    """Flush files and the dir itself so a crash after rename can't expose empty files."""
    for p in path.iterdir():
        if p.is_file() and not p.is_symlink():
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def install_dir(tmp: Path, dest: Path) -> Path:
    """Move a finished temp dir to `dest`, replacing an older version of it."""
    fsync_dir_tree(tmp)
    nofollow.chmod(tmp, 0o755)
    old = None
    if dest.exists() or dest.is_symlink():
        old = dest.with_name(f".old-{dest.name}-{os.getpid()}")
        os.rename(dest, old)
    os.rename(tmp, dest)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return dest


def link_or_copy(src: Path, dst: Path) -> None:
    """Hard link (same filesystem, no extra space), copying when links are impossible."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def set_default(image_name: str) -> None:
    """Point images/default at `image_name` atomically (a new symlink renamed over the old one)."""
    root = images_dir()
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".tmp-default-{os.getpid()}"
    if tmp.is_symlink():
        tmp.unlink()
    os.symlink(image_name, tmp)
    os.replace(tmp, root / DEFAULT)


def clean_stale_temps(parent: Path) -> None:
    """Remove temp dirs left by interrupted builds (only ours: the .tmp-/.old- prefixes)."""
    if not parent.is_dir():
        return
    for p in parent.iterdir():
        if p.name.startswith((".tmp-", ".old-")) and not _owned_by_live_process(p):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)


def _owned_by_live_process(p: Path) -> bool:
    # Temp dirs are young while their builder runs; only reap ones untouched for a day.
    import time
    try:
        return time.time() - p.lstat().st_mtime < 86400
    except FileNotFoundError:
        return True
