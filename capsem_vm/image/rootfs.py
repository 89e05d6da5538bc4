"""The root filesystem layer: a Debian minbase (mmdebstrap) with the recipe's packages, packed
read-only as EROFS (lz4hc). The guest agent is not in here (it ships in the initramfs)."""

from __future__ import annotations

import os
import shlex
import shutil
from pathlib import Path

from capsem_vm import nofollow
from capsem_vm.errors import ImageError, MissingHelperError

from . import store
from .debian import Mirrors
from .progress import Progress, find_tool
from .recipe import Recipe
from .userns import check_unprivileged_build

ROOTFS_NAME = "rootfs.erofs"

# Not needed in a kernel VM; dropping them saves space and image hashing time.
_DPKG_EXCLUDES = [
    "path-exclude=/usr/share/man/*", "path-exclude=/usr/share/doc/*",
    "path-include=/usr/share/doc/*/copyright", "path-exclude=/usr/share/info/*",
    "path-exclude=/usr/share/locale/*", "path-include=/usr/share/locale/locale.alias",
    "path-exclude=/usr/share/lintian/*",
]
# Build-time-only packages that Debian makes hard dependencies (python3-matplotlib -> fonttools
# -> scipy -> pythran -> boost/openblas headers, python3-all-dev; debugpy -> gdb). ~250 MB that
# a kernel never uses at run time: purged with --force-depends (the guest is ephemeral and has no
# apt lists, so the unmet dependencies in dpkg's database don't matter). gcc stays for pip builds.
TRIM_PACKAGES = ("libboost1.74-dev", "libboost-dev", "libopenblas-dev", "libopenblas-pthread-dev",
                 "python3-pythran", "python3-all-dev", "libpython3-all-dev", "gdb")
# Run inside the build (with mmdebstrap's mounts still up) after all packages are installed.
# Not the chroot's /tmp: mmdebstrap keeps its apt.conf there for its own final `apt-get update`
# and empties /tmp itself afterwards; without that file apt used the host's configuration, so as
# root that update emptied the host's /var/lib/apt/lists, and as a user it failed on their lock.
_CLEANUP = ('rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/*.bin "$1"/var/cache/apt/archives/*.deb '
            '"$1"/var/log/*.log "$1"/var/log/apt/* "$1"/root/.cache')


def build_mode() -> str:
    """mmdebstrap mode: 'root' as root, else 'unshare' when this user can build without root
    (ImageError naming each missing piece otherwise, see userns.py)."""
    if os.geteuid() == 0:
        return "root"
    check_unprivileged_build()
    return "unshare"


def mmdebstrap_argv(recipe: Recipe, mirrors: Mirrors, mode: str, target: Path) -> list[str]:
    argv = ["mmdebstrap", "--variant=minbase", f"--mode={mode}",
            "--aptopt=APT::Install-Recommends \"false\"", f"--include={','.join(recipe.packages)}"]
    argv += [f"--dpkgopt={opt}" for opt in _DPKG_EXCLUDES]
    if recipe.pip:
        # pip runs in the chroot, with the host's network and (build-time only) resolv.conf.
        reqs = " ".join(shlex.quote(r) for r in recipe.pip)
        argv.append('--customize-hook=cp -L /etc/resolv.conf "$1"/etc/resolv.conf && chroot "$1" '
                    "python3 -m pip install --no-cache-dir --break-system-packages --root-user-action=ignore "
                    f"{reqs}")
    trim = [p for p in TRIM_PACKAGES if p not in recipe.apt]
    argv.append(f'--customize-hook=chroot "$1" dpkg --purge --force-depends {" ".join(trim)}')
    argv.append(f"--customize-hook={_CLEANUP}")
    argv += [recipe.suite, str(target), *mirrors.apt_lines(recipe.suite)]
    return argv


def mkfs_argv(out: Path, tree: Path) -> list[str]:
    return ["mkfs.erofs", "-zlz4hc", "--quiet", str(out), str(tree)]


def unpack_and_pack_argv(tarball: Path, tree: Path, out: Path) -> list[str]:
    """Unprivileged: ownership only exists inside a user namespace (the user's subordinate ids), so
    the tarball is unpacked and packed as EROFS inside one. Device nodes cannot be made there; the
    guest mounts devtmpfs on /dev anyway (the /dev directory itself stays)."""
    return ["unshare", "--map-auto", "--map-root-user", "sh", "-c",
            f"mkdir {shlex.quote(str(tree))} && tar -xpf {shlex.quote(str(tarball))} -C {shlex.quote(str(tree))}"
            f" --exclude='./dev/*' && {shlex.join(mkfs_argv(out, tree))}"]


def cached_rootfs(recipe: Recipe) -> Path | None:
    """The built rootfs of this recipe: the user's own, else (read only) the system's."""
    for layer in store.layer_candidates("rootfs", recipe.rootfs_key()):
        if (layer / ROOTFS_NAME).is_file():
            return layer / ROOTFS_NAME
    return None


def ensure_rootfs(recipe: Recipe, mirrors: Mirrors, progress: Progress, refresh: bool = False) -> Path:
    """Return the path of rootfs.erofs for this recipe, building it if not cached (or refresh)."""
    key = recipe.rootfs_key()
    root = store.layers_dir("rootfs")
    layer = root / key
    found = None if refresh else cached_rootfs(recipe)
    if found:
        progress.say("rootfs: cached" + ("" if found.parent == layer else f" (the system's, {found})"))
        return found
    for tool, package in (("mmdebstrap", "mmdebstrap"), ("mkfs.erofs", "erofs-utils")):
        if not find_tool(tool):
            raise MissingHelperError(f"{tool} is not installed", f"install {package} (`capsem setup` as root)")
    mode = build_mode()
    work = store.new_temp_dir(root, "rootfs")
    try:
        tree = work / "tree"
        extras = f" + {len(recipe.apt)} apt, {len(recipe.pip)} pip" if not recipe.is_default else ""
        with progress.stage(f"rootfs: mmdebstrap {recipe.suite} minbase ({len(recipe.packages)} packages"
                            f"{extras}; mirror {mirrors.main}; a few minutes)"):
            if mode == "root":
                progress.run(mmdebstrap_argv(recipe, mirrors, mode, tree))
            else:
                # Unprivileged: ownership only exists inside the user namespace, so unpack the
                # tarball and pack EROFS inside one too (see pack below).
                progress.run(mmdebstrap_argv(recipe, mirrors, mode, work / "rootfs.tar"))
        with progress.stage("rootfs: pack EROFS (lz4hc)"):
            out = work / ROOTFS_NAME
            if mode == "root":
                progress.run(mkfs_argv(out, tree))
            else:
                progress.run(unpack_and_pack_argv(work / "rootfs.tar", tree, out))
            nofollow.chmod(out, 0o644)
        with progress.stage("rootfs: clean up the build tree"):
            _remove_tree(tree, mode, progress)
            (work / "rootfs.tar").unlink(missing_ok=True)
        store.install_dir(work, layer)
        work = None
        return layer / ROOTFS_NAME
    finally:
        if work is not None:
            try:
                _remove_tree(work, "root" if os.geteuid() == 0 else "unshare", progress)
            except ImageError:
                pass  # a stale temp dir is reaped by a later build; keep the original error


def _remove_tree(path: Path, mode: str, progress: Progress) -> None:
    if not path.exists():
        return
    if mode == "unshare":
        # Files owned by subordinate ids can only be removed from inside the namespace.
        progress.run(["unshare", "--map-auto", "--map-root-user", "rm", "-rf", str(path)])
    else:
        shutil.rmtree(path, ignore_errors=True)
