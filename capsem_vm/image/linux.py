"""The kernel layer: Debian's cloud kernel .deb, unpacked (vmlinuz + its module tree), and the
uncompressed kernel (vmlinux) that VMs boot.

Why vmlinux: QEMU boots an ELF kernel with a PVH entry point (CONFIG_PVH) directly, with no
real-mode setup and no decompression in the guest. Under TCG decompressing Debian's bzImage (LZ4,
~50 MB) took over a second of every boot. The price: the kernel runs at its link address (no
KASLR of the guest kernel's text; the other layout randomisation stays), which matters inside the
guest only; the VM boundary is what protects the host.
"""

from __future__ import annotations

import gzip
import lzma
import re
import shutil
import struct
import subprocess
from dataclasses import dataclass
from pathlib import Path

from capsem_vm import nofollow
from capsem_vm.dirfile import DirFile
from capsem_vm.errors import ImageError, MissingHelperError

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

    vmlinuz = DirFile("vmlinuz", of="dir")
    vmlinux = DirFile("vmlinux", of="dir")
    modules = DirFile("root", of="dir")  # the module tree root: lib/modules/<version> below it


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
            layer = KernelLayer(layer_dir, key, uname)
            if not layer.vmlinux.is_file():  # a layer from before vmlinux: add it (atomically)
                with progress.stage("kernel: extract vmlinux"):
                    tmp = layer_dir / ".vmlinux.tmp"
                    tmp.write_bytes(extract_vmlinux(layer.vmlinuz.read_bytes()))
                    nofollow.chmod(tmp, 0o644)
                    tmp.rename(layer.vmlinux)
            return layer
        for found in store.layer_candidates("kernel", key)[1:]:  # the system's, read only: complete or not at all
            if all((found / name).is_file() for name in ("vmlinuz", "vmlinux", "DONE")):
                progress.say(f"kernel: {key} (cached, the system's: {found})")
                return KernelLayer(found, key, uname)
        with progress.stage(f"kernel: download and unpack {key}"):
            deb = apt.download(f"{package}={version}", work)
            progress.run(["dpkg-deb", "-x", deb, work / "root"])
            shutil.copy2(work / "root" / "boot" / f"vmlinuz-{uname}", work / "vmlinuz")
            shutil.copy2(work / "root" / "boot" / f"config-{uname}", work / "config")
            (work / "vmlinux").write_bytes(extract_vmlinux((work / "vmlinuz").read_bytes()))
            nofollow.chmod(work / "vmlinux", 0o644)
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




# Compressed payloads of a bzImage by their first bytes. All but gzip end with the kernel build's
# 4-byte uncompressed size (size_append in scripts/Makefile.lib), which the decoders don't want.
_PAYLOADS = {
    b"\x1f\x8b": ("gzip", False),
    b"\xfd7zXZ\x00": ("xz", True),
    b"\x5d\x00\x00": ("lzma", True),
    b"\x28\xb5\x2f\xfd": ("zstd", True),
    b"\x02\x21\x4c\x18": ("lz4", True),  # the legacy LZ4 frame
}
PT_NOTE = 4
XEN_ELFNOTE_PHYS32_ENTRY = 18  # the PVH entry point QEMU looks for


def extract_vmlinux(bzimage: bytes) -> bytes:
    """The uncompressed ELF kernel inside a bzImage (boot protocol >= 2.08), checked for PVH."""
    if bzimage[0x202:0x206] != b"HdrS" or struct.unpack_from("<H", bzimage, 0x206)[0] < 0x208:
        raise ImageError("the kernel is not a bzImage with boot protocol 2.08 or later")
    setup_sects = bzimage[0x1F1] or 4
    offset, length = struct.unpack_from("<II", bzimage, 0x248)
    start = (setup_sects + 1) * 512 + offset
    payload = bzimage[start:start + length]
    for magic, (kind, sized) in _PAYLOADS.items():
        if payload.startswith(magic):
            break
    else:
        raise ImageError(f"unknown kernel compression (payload starts {payload[:6].hex()})")
    if sized:
        payload = payload[:-4]
    if kind == "gzip":
        elf = gzip.decompress(payload)
    elif kind in ("xz", "lzma"):
        elf = lzma.decompress(payload, lzma.FORMAT_XZ if kind == "xz" else lzma.FORMAT_ALONE)
    else:
        tool = shutil.which(kind)
        if not tool:
            raise MissingHelperError(f"{kind} is not installed (the kernel is {kind}-compressed)",
                                     "run `capsem setup` as root")
        elf = subprocess.run([tool, "-d", "-c"], input=payload, capture_output=True, check=True).stdout
    check_pvh_elf(elf)
    return elf


def check_pvh_elf(elf: bytes) -> None:
    """A 64-bit ELF with a PVH entry note, or ImageError."""
    if elf[:5] != b"\x7fELF\x02":
        raise ImageError("the decompressed kernel is not a 64-bit ELF file")
    phoff, = struct.unpack_from("<Q", elf, 32)
    phentsize, phnum = struct.unpack_from("<HH", elf, 54)
    for i in range(phnum):
        p_type, _flags, p_offset, _vaddr, _paddr, p_filesz = struct.unpack_from("<IIQQQQ", elf, phoff + i * phentsize)
        if p_type != PT_NOTE:
            continue
        pos, end = p_offset, p_offset + p_filesz
        while pos + 12 <= end:
            namesz, descsz, n_type = struct.unpack_from("<III", elf, pos)
            name = elf[pos + 12:pos + 12 + namesz].rstrip(b"\0")
            if name == b"Xen" and n_type == XEN_ELFNOTE_PHYS32_ENTRY:
                return
            pos += 12 + (namesz + 3) // 4 * 4 + (descsz + 3) // 4 * 4
    raise ImageError("the kernel has no PVH entry point (built without CONFIG_PVH): QEMU cannot boot it directly")
