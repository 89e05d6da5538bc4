"""The initramfs: busybox, the boot modules (+ on-demand nftables modules), /init and the agent."""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import shutil
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

from capsem_vm.errors import ImageError, MissingHelperError

from . import store
from .agent_source import PACKAGE, AgentFile, AgentTree, find_agent_tree
from .cpio import NewcWriter
from .linux import KernelLayer
from .modules import BACKGROUND_MODULES, BOOT_MODULES, ON_DEMAND_MODULES, copy_modules, load_order
from .progress import Progress
from .recipe import digest_of

# Bump when the initramfs layout or /init handling changes (independent of the rootfs's version).
INITRAMFS_VERSION = 4
# The guest's Python (Debian bookworm): the agent's bytecode is precompiled when the host's
# Python has the same version, so the guest doesn't compile it at every boot under TCG.
GUEST_PYTHON = (3, 11)

BUSYBOX = Path("/bin/busybox")
# zstd: the kernel supports it (CONFIG_RD_ZSTD) and it decompresses faster than gzip under TCG
# while compressing better than lz4; see tests/docs for the measurement.
COMPRESSION = "zstd"
INITRD_NAME = "initrd.img"


def check_busybox(path: Path = BUSYBOX) -> Path:
    """The initramfs has no libc: busybox must be the static build (package busybox-static)."""
    if not path.is_file():
        raise MissingHelperError(f"{path} not found", "install busybox-static (`capsem setup` as root)")
    with open(path, "rb") as f:
        head = f.read(64)
        if head[:4] != b"\x7fELF" or head[4] != 2:
            raise ImageError(f"{path} is not a 64-bit ELF binary")
        phoff, = struct.unpack_from("<Q", head, 32)
        phentsize, phnum = struct.unpack_from("<HH", head, 54)
        f.seek(phoff)
        table = f.read(phentsize * phnum)
    for i in range(phnum):
        if struct.unpack_from("<I", table, i * phentsize)[0] == 3:  # PT_INTERP: dynamically linked
            raise MissingHelperError(f"{path} is dynamically linked",
                                     "install busybox-static instead of busybox (`capsem setup` as root)")
    return path


def agent_files_digest(tree: AgentTree) -> str:
    """The agent's files (paths, bytes, executable bits): the same for a checkout and its wheel."""
    h = hashlib.sha256()
    for f in tree.files():
        rel = f.rel.encode()
        data = f.path.read_bytes()
        h.update(b"%d:%s:%d:%o:" % (len(rel), rel, len(data), f.mode & 0o111) + data)
    return h.hexdigest()


def local_inputs_digest() -> str:
    """Everything the initramfs depends on except the kernel: decides the image key offline."""
    return digest_of({
        "initramfs_version": INITRAMFS_VERSION, "pyc": _can_precompile(),
        "files": agent_files_digest(find_agent_tree()),
        "busybox": hashlib.sha256(check_busybox().read_bytes()).hexdigest(),
        "boot_modules": list(BOOT_MODULES), "background_modules": list(BACKGROUND_MODULES),
        "on_demand_modules": list(ON_DEMAND_MODULES),
        "compression": COMPRESSION, "python": sys.version,
    })


# Read ahead at boot (see /init): what the guest's Python reads before the agent's hello, in the
# order it reads it. The interpreter and its libraries (Debian bookworm amd64 paths), then the
# bytecode of the stdlib modules the agent imports, found by importing the agent with this
# (same-version) Python. Paths that do not exist in the guest are skipped by /init.
GUEST_STDLIB = "usr/lib/python3.11"
READAHEAD_BASE = ("usr/bin/python3.11", "usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2",
                  "usr/lib/x86_64-linux-gnu/libc.so.6", "usr/lib/x86_64-linux-gnu/libm.so.6",
                  "usr/lib/x86_64-linux-gnu/libz.so.1", "usr/lib/x86_64-linux-gnu/libexpat.so.1")
_IMPORTED_BY_AGENT = r"""
import sys
sys.path.insert(0, sys.argv[1])
sys.modules["ssl"] = None  # as the launcher does
import capsem_agent.supervisor, capsem_agent.sysinit, capsem_agent.service
imported = list(sys.modules.values())
import sysconfig
stdlib = sysconfig.get_paths()["stdlib"] + "/"
for m in imported:
    origin = getattr(getattr(m, "__spec__", None), "origin", None) or ""
    if origin.startswith(stdlib):
        print(origin[len(stdlib):])
"""


def readahead_list(tree: AgentTree) -> list[str]:
    """Guest paths (relative to its root) to read ahead at boot; [] when this Python is not the
    guest's version (the list would be wrong; booting works without it, only slower)."""
    if not _can_precompile():
        return []
    # the package alone on sys.path[0]: in a wheel its parent is site-packages, whose other
    # modules must not stand in for stdlib ones the guest imports
    with tempfile.TemporaryDirectory() as d:
        os.symlink(tree.package_dir, Path(d) / PACKAGE)
        out = subprocess.run([sys.executable, "-I", "-S", "-c", _IMPORTED_BY_AGENT, d],
                             check=True, capture_output=True, text=True).stdout
    paths = list(READAHEAD_BASE)
    for rel in out.split():
        rel_path = Path(rel)
        if rel_path.suffix == ".py":
            pyc = rel_path.parent / "__pycache__" / f"{rel_path.stem}.{sys.implementation.cache_tag}.pyc"
            paths.append(f"{GUEST_STDLIB}/{pyc.as_posix()}")
        elif rel_path.suffix == ".so" and rel_path.parts[0] == "lib-dynload":
            paths.append(f"{GUEST_STDLIB}/{rel}")
    return list(dict.fromkeys(paths))


def busybox_applets() -> list[str]:
    out = subprocess.run([str(BUSYBOX), "--list"], check=True, capture_output=True, text=True).stdout
    return sorted(set(out.split()) - {"busybox"})


def write_cpio(out, kernel: KernelLayer, staging_moddir: Path, boot_order: list[str],
               background_order: list[str] = ()) -> None:
    tree = find_agent_tree()
    files = tree.files()
    moddir = f"lib/modules/{kernel.version}"
    w = NewcWriter(out)
    for d in ("bin", "dev", "proc", "sys", "etc", "etc/capsem", "lib", "lib/modules", "capsem",
              "newroot", "lower", "rw"):
        w.directory(d)
    w.char_device("dev/console", 5, 1)
    w.file("bin/busybox", BUSYBOX.read_bytes(), 0o755)
    for applet in busybox_applets():
        w.symlink(f"bin/{applet}", "busybox")
    init = files.pop(0)
    assert init.rel == "init"
    w.file("init", init.path.read_bytes(), 0o755)
    w.file("etc/capsem/modules.boot", "".join(f"/{moddir}/{rel}\n" for rel in boot_order).encode())
    w.file("etc/capsem/modules.background",
           "".join(f"/{moddir}/{rel}\n" for rel in background_order).encode())
    w.file("etc/capsem/readahead", "".join(f"{p}\n" for p in readahead_list(tree)).encode())
    w.directory(moddir)
    w.tree(staging_moddir, moddir)
    made = set()

    def directory(rel_dir: Path):
        for d in reversed([rel_dir, *rel_dir.parents][:-1]):
            if d not in made:
                made.add(d)
                w.directory(f"capsem/{d.as_posix()}")

    for rel, data, mode in agent_entries(files):
        directory(Path(rel).parent)
        w.file(f"capsem/{rel}", data, mode)
    w.close()


def agent_entries(files: list[AgentFile]) -> list[tuple[str, bytes, int]]:
    """(path under /capsem/, content, mode) of the agent's files and their bytecode: the part of
    the initramfs that comes from the agent tree (besides /init)."""
    out = []
    for f in files:
        rel = Path(f.rel)
        out.append((f.rel, f.path.read_bytes(), f.mode))
        if rel.suffix == ".py" and _can_precompile():
            pyc = rel.parent / "__pycache__" / f"{rel.stem}.{sys.implementation.cache_tag}.pyc"
            out.append((pyc.as_posix(), _bytecode(f.path, f"/opt/capsem/{f.rel}"), 0o644))
    return out


def _can_precompile() -> bool:
    return sys.version_info[:2] == GUEST_PYTHON and sys.implementation.name == "cpython"


def _bytecode(source: Path, guest_path: str) -> bytes:
    """An unchecked-hash .pyc: valid without matching mtimes (cpio entries have mtime 0)."""
    import importlib.util
    import py_compile
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "x.pyc"
        py_compile.compile(str(source), cfile=str(out), dfile=guest_path, doraise=True,
                           invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH)
        data = out.read_bytes()
    assert data[:4] == importlib.util.MAGIC_NUMBER
    return data


def compress(data: bytes, method: str, progress: Progress) -> bytes:
    if method == "none":
        return data
    if method == "gzip":
        return gzip.compress(data, compresslevel=9, mtime=0)
    if method == "zstd":
        argv = ["zstd", "-q", "-19", "-c", "-"]
    elif method == "lz4":
        argv = ["lz4", "-q", "-l", "-9", "-c", "-"]  # -l: the legacy frame the kernel expects
    else:
        raise ValueError(method)
    if not shutil.which(argv[0]):
        raise MissingHelperError(f"{argv[0]} is not installed", "run `capsem setup` as root")
    return subprocess.run(argv, input=data, check=True, capture_output=True).stdout


def initramfs_key(kernel: KernelLayer) -> str:
    return digest_of({"local": local_inputs_digest(), "kernel": kernel.key})


def ensure_initramfs(kernel: KernelLayer, progress: Progress, compression: str = COMPRESSION) -> Path:
    """Return the path of the initrd.img for this kernel + agent, building it if not cached."""
    key = initramfs_key(kernel) if compression == COMPRESSION else \
        digest_of({"local": local_inputs_digest(), "kernel": kernel.key, "compression": compression})
    root = store.layers_dir("initramfs")
    layer = root / key
    if (layer / INITRD_NAME).is_file():
        progress.say("initramfs: cached")
        return layer / INITRD_NAME
    work = store.new_temp_dir(root, "initramfs")
    try:
        with progress.stage(f"initramfs: modules, busybox, agent ({compression})"):
            src = kernel.modules / "lib" / "modules" / kernel.version
            boot = load_order(src, BOOT_MODULES)
            background = [m for m in load_order(src, BOOT_MODULES + BACKGROUND_MODULES) if m not in boot]
            wanted = load_order(src, BOOT_MODULES + BACKGROUND_MODULES + ON_DEMAND_MODULES)
            staging = work / "staging" / "lib" / "modules" / kernel.version
            copy_modules(src, staging, wanted)
            # Indexes for exactly the shipped subset, so modprobe in the guest resolves them.
            progress.run(["depmod", "-b", work / "staging", kernel.version])
            buf = io.BytesIO()
            write_cpio(buf, kernel, staging, boot, background)
            (work / INITRD_NAME).write_bytes(compress(buf.getvalue(), compression, progress))
            shutil.rmtree(work / "staging")
        store.install_dir(work, layer)
        work = None
        return layer / INITRD_NAME
    finally:
        if work is not None:
            shutil.rmtree(work, ignore_errors=True)
