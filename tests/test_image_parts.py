"""The image build's small parts, on real inputs: module ordering, the cpio writer, the /init
script, apt sources parsing, the store's name/path resolution and atomic default link, the
vmlinux extraction."""

import gzip
import io
import lzma
import os
import struct
import subprocess
from pathlib import Path

import pytest

from capsem_vm.errors import ImageError
from capsem_vm.image import store
from capsem_vm.image.cpio import NewcWriter
from capsem_vm.image.debian import DEFAULT_MIRROR, host_mirrors
from capsem_vm.image.linux import extract_vmlinux
from capsem_vm.image.manifest import ASSET_FILES, write_manifest_for
from capsem_vm.image.modules import load_order

REPO = Path(__file__).resolve().parents[1]


def write_moddir(d: Path, dep_lines: str, softdep: str = "") -> Path:
    d.mkdir(parents=True, exist_ok=True)
    (d / "modules.dep").write_text(dep_lines)
    (d / "modules.softdep").write_text(softdep)
    return d


def test_load_order_puts_dependencies_first(tmp_path):
    d = write_moddir(tmp_path, "k/virtio_pci.ko: k/virtio_ring.ko k/virtio.ko k/virtio_pci_modern_dev.ko\n"
                               "k/virtio_ring.ko: k/virtio.ko\nk/virtio.ko:\nk/virtio_pci_modern_dev.ko:\n"
                               "k/erofs.ko: k/libcrc32c.ko\nk/libcrc32c.ko:\nk/unused.ko:\n",
                     "softdep libcrc32c pre: crc32c\n")
    order = load_order(d, ("virtio_pci", "erofs"))
    assert set(order) == {"k/virtio_pci.ko", "k/virtio_ring.ko", "k/virtio.ko", "k/virtio_pci_modern_dev.ko",
                          "k/erofs.ko", "k/libcrc32c.ko"}
    assert order.index("k/virtio.ko") < order.index("k/virtio_ring.ko") < order.index("k/virtio_pci.ko")
    assert order.index("k/libcrc32c.ko") < order.index("k/erofs.ko")


def test_load_order_honours_softdeps_that_exist(tmp_path):
    d = write_moddir(tmp_path, "k/a.ko:\nk/b.ko:\n", "softdep a pre: b missing_builtin\n")
    assert load_order(d, ("a",)) == ["k/b.ko", "k/a.ko"]


def test_load_order_missing_module_and_cycle(tmp_path):
    d = write_moddir(tmp_path, "k/a.ko: k/b.ko\nk/b.ko: k/a.ko\n")
    with pytest.raises(ImageError, match="cycle"):
        load_order(d, ("a",))
    with pytest.raises(ImageError, match="not found"):
        load_order(d, ("nope",))


def test_cpio_is_readable_by_cpio_tool(tmp_path):
    buf = io.BytesIO()
    w = NewcWriter(buf)
    w.directory("bin")
    w.file("bin/hello", b"#!/bin/sh\necho hi\n", 0o755)
    w.symlink("bin/sh", "busybox")
    w.char_device("console", 5, 1)
    w.close()
    assert len(buf.getvalue()) % 512 == 0
    listing = subprocess.run(["cpio", "-tv"], input=buf.getvalue(), capture_output=True, check=True).stdout.decode()
    assert "bin/hello" in listing and "bin/sh -> busybox" in listing and listing.splitlines()[3].startswith("c")
    out = tmp_path / "x"
    out.mkdir()
    subprocess.run(["cpio", "-id", "--no-absolute-filenames", "bin/hello"], input=buf.getvalue(), cwd=out,
                   check=True, capture_output=True)
    assert (out / "bin/hello").read_bytes() == b"#!/bin/sh\necho hi\n"


def test_init_script_parses_and_follows_the_boot_contract():
    init = REPO / "guest-agent" / "init"
    subprocess.run(["busybox", "sh", "-n", str(init)], check=True)
    text = init.read_text()
    for needle in ("mount -t proc", "mount -t devtmpfs", "/etc/capsem/modules.boot", "mount -t erofs -o ro /dev/vda",
                   "lowerdir=/lower,upperdir=/rw/upper", '"/capsem /newroot/opt/capsem"', "/newroot/run/capsem/init-times",
                   "/etc/capsem/modules.background", "mount --move . /",
                   "(cd /lower && xargs cat </etc/capsem/readahead >/dev/null 2>&1) &",
                   "exec chroot . /usr/bin/python3 -I -S /opt/capsem/capsem-agent", "poweroff -f"):
        assert needle in text, needle


def test_host_mirrors_from_deb822_and_one_line(tmp_path):
    etc = tmp_path / "apt"
    (etc / "sources.list.d").mkdir(parents=True)
    (etc / "sources.list.d" / "debian.sources").write_text(
        "Types: deb\n# comment\nURIs: http://mirror.example/debian/\nSuites: bookworm bookworm-updates\n"
        "Components: main\n\nTypes: deb\nURIs: http://sec.example/debian-security\nSuites: bookworm-security\n")
    m = host_mirrors(etc)
    assert (m.main, m.security) == ("http://mirror.example/debian", "http://sec.example/debian-security")
    etc2 = tmp_path / "apt2"
    etc2.mkdir()
    (etc2 / "sources.list").write_text("deb [arch=amd64] http://m2.example/debian bookworm main\n")
    assert host_mirrors(etc2).main == "http://m2.example/debian"
    assert host_mirrors(tmp_path / "none").main == DEFAULT_MIRROR


def test_store_resolution_and_default_link(tmp_path, monkeypatch):
    monkeypatch.setenv("CAPSEM_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("CAPSEM_SYSTEM_CACHE_DIR", str(tmp_path / "system"))
    with pytest.raises(ImageError, match="capsem image build"):
        store.default_image_dir()
    d = store.images_dir() / "abc"
    d.mkdir(parents=True)
    for name in ASSET_FILES.values():
        (d / name).write_bytes(os.urandom(10))
    write_manifest_for(d, kernel_version="k", recipe={})
    store.set_default("abc")
    store.set_default("abc")  # replacing the link is fine
    assert store.default_image_dir() == d.resolve()
    assert store.resolve_image(None) == store.resolve_image("default") == store.resolve_image("abc") == d.resolve()
    assert store.resolve_image(str(d)) == d.resolve()
    assert store.list_images() == ["abc", "default"]
    with pytest.raises(ImageError, match="invalid image name"):
        store.resolve_image("..hidden")
    with pytest.raises(ImageError, match="no VM image"):
        store.resolve_image("other")


def test_users_fall_back_to_the_system_image(tmp_path, monkeypatch):
    monkeypatch.setenv("CAPSEM_CACHE_DIR", str(tmp_path / "user"))
    monkeypatch.setenv("CAPSEM_SYSTEM_CACHE_DIR", str(tmp_path / "system"))
    system = tmp_path / "system" / "images" / "sys1"
    system.mkdir(parents=True)
    for name in ASSET_FILES.values():
        (system / name).write_bytes(os.urandom(10))
    write_manifest_for(system, kernel_version="k", recipe={})
    (system.parent / "default").symlink_to("sys1")
    assert store.default_image_dir() == system.resolve()
    # The user's own default image wins over the system one.
    mine = store.images_dir() / "mine"
    mine.mkdir(parents=True)
    for name in ASSET_FILES.values():
        (mine / name).write_bytes(os.urandom(10))
    write_manifest_for(mine, kernel_version="k", recipe={})
    store.set_default("mine")
    assert store.default_image_dir() == mine.resolve()


def test_install_dir_replaces_atomically(tmp_path):
    dest = tmp_path / "layer"
    for content in (b"one", b"two"):
        tmp = store.new_temp_dir(tmp_path, "layer")
        (tmp / "f").write_bytes(content)
        store.install_dir(tmp, dest)
    assert (dest / "f").read_bytes() == b"two"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["layer"]


def _elf(pvh: bool) -> bytes:
    """A minimal 64-bit ELF with one PT_NOTE segment (a Xen note, PVH entry or not)."""
    name = b"Xen\0"
    note = struct.pack("<III", len(name), 8, 18 if pvh else 5) + name + struct.pack("<Q", 0x1000000)
    phoff, phentsize = 64, 56
    header = b"\x7fELF\x02\x01\x01" + b"\0" * 9 + struct.pack("<HHIQQQIHHHHHH", 2, 62, 1, 0, phoff, 0, 0, 64,
                                                                   phentsize, 1, 0, 0, 0)
    ph = struct.pack("<IIQQQQQQ", 4, 4, phoff + phentsize, 0, 0, len(note), len(note), 4)
    return header + ph + note


def _bzimage(payload: bytes) -> bytes:
    setup = bytearray(5 * 512)  # setup_sects = 4 (stored as 0: "means 4")
    setup[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", setup, 0x206, 0x20F)
    struct.pack_into("<II", setup, 0x248, 0x40, len(payload))
    return bytes(setup) + b"\0" * 0x40 + payload + b"trailing"


@pytest.mark.parametrize("kind", ["gzip", "xz", "lz4", "zstd"])
def test_extract_vmlinux_from_each_bzimage_compression(kind):
    elf = _elf(pvh=True)
    size = struct.pack("<I", len(elf))  # the kernel build appends the size to all but gzip
    if kind == "gzip":
        payload = gzip.compress(elf)
    elif kind == "xz":
        payload = lzma.compress(elf, lzma.FORMAT_XZ, check=lzma.CHECK_CRC32) + size
    else:
        argv = {"lz4": ["lz4", "-l", "-c"], "zstd": ["zstd", "-q", "-c"]}[kind]
        payload = subprocess.run(argv, input=elf, capture_output=True, check=True).stdout + size
    assert extract_vmlinux(_bzimage(payload)) == elf


def test_extract_vmlinux_refuses_kernels_qemu_cannot_boot_directly():
    with pytest.raises(ImageError, match="PVH"):
        extract_vmlinux(_bzimage(gzip.compress(_elf(pvh=False))))
    with pytest.raises(ImageError, match="bzImage"):
        extract_vmlinux(b"\0" * 4096)
    with pytest.raises(ImageError, match="compression"):
        extract_vmlinux(_bzimage(b"\x00\x11\x22\x33 not compressed"))
