"""The kernel layer: Debian's cloud kernel .deb, unpacked (vmlinuz + its module tree)."""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from capsem_vm.errors import ImageError

from . import store
from .debian import PrivateApt, deb_field
from .progress import Progress
from .recipe import KERNEL_META_PACKAGE


@dataclass(frozen=True)
class KernelLayer:
    dir: Path
    package: str   # e.g. linux-image-6.1.0-56-cloud-amd64=6.1.192-2
    version: str   # uname -r, e.g. 6.1.0-56-cloud-amd64

    @property
    def key(self) -> str:
        return self.package

    @property
    def vmlinuz(self) -> Path:
        return self.dir / "vmlinuz"

    @property
    def modules(self) -> Path:
        """The module tree root: lib/modules/<version> below it."""
        return self.dir / "root"


def resolve_kernel_package(apt: PrivateApt, workdir: Path) -> tuple[str, str]:
    """(versioned package name, its version): the real package the meta package depends on."""
    meta = apt.download(KERNEL_META_PACKAGE, workdir)
    depends = deb_field(meta, "Depends")
    m = re.search(r"(linux-image-[0-9][^\s,(]*-cloud-amd64)\s*\(\s*=\s*([^\s)]+)\)", depends)
    if not m:
        raise ImageError(f"cannot find the kernel package in {KERNEL_META_PACKAGE}'s Depends: {depends!r}")
    return m.group(1), m.group(2)


def ensure_kernel(apt: PrivateApt, progress: Progress) -> KernelLayer:
    """Return the kernel layer for the current candidate kernel, downloading it if not cached."""
    root = store.layers_dir("kernel")
    work = store.new_temp_dir(root, "kernel")
    try:
        package, version = resolve_kernel_package(apt, work)
        key = f"{package}={version}"
        layer_dir = root / key
        uname = package.removeprefix("linux-image-")
        if (layer_dir / "vmlinuz").is_file() and (layer_dir / "DONE").is_file():
            progress.say(f"kernel: {key} (cached)")
            return KernelLayer(layer_dir, key, uname)
        with progress.stage(f"kernel: download and unpack {key}"):
            deb = apt.download(f"{package}={version}", work)
            progress.run(["dpkg-deb", "-x", deb, work / "root"])
            shutil.copy2(work / "root" / "boot" / f"vmlinuz-{uname}", work / "vmlinuz")
            shutil.copy2(work / "root" / "boot" / f"config-{uname}", work / "config")
            shutil.rmtree(work / "root" / "boot")
            shutil.rmtree(work / "root" / "usr", ignore_errors=True)
            for deb_file in work.glob("*.deb"):
                deb_file.unlink()
            modules = work / "root" / "lib" / "modules" / uname
            if not modules.is_dir():
                raise ImageError(f"{package} has no lib/modules/{uname}")
            # The .deb ships no modules.dep: generate it (and the alias indexes) once here.
            progress.run(["depmod", "-b", work / "root", uname])
            (work / "DONE").write_text(key + "\n")
        store.install_dir(work, layer_dir)
        work = None
        return KernelLayer(layer_dir, key, uname)
    finally:
        if work is not None:
            shutil.rmtree(work, ignore_errors=True)


def kernel_supports(layer: KernelLayer, option: str) -> bool:
    """Is CONFIG_<option>=y in the kernel's config (e.g. RD_LZ4)?"""
    try:
        return f"CONFIG_{option}=y" in (layer.dir / "config").read_text().splitlines()
    except OSError:
        return False


