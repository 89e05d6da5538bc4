"""The real image build (cached after the first run) and what it produced. Slow the first time:
mmdebstrap of the rootfs takes a few minutes; later runs reuse the cache."""

import io
import subprocess
import time

import pytest

from capsem_vm.image import store
from capsem_vm.image.build import build_image
from capsem_vm.image.progress import Progress
from capsem_vm.image.recipe import Recipe
from capsem_vm.image.verify import open_verified

pytestmark = [pytest.mark.vm, pytest.mark.timeout(1800)]


def read_newc(data: bytes) -> dict[str, bytes]:
    """name -> content of a newc archive (enough to inspect the initramfs)."""
    files, pos = {}, 0
    while True:
        assert data[pos:pos + 6] == b"070701"
        fields = [int(data[pos + 6 + 8 * i: pos + 14 + 8 * i], 16) for i in range(13)]
        size, namesize = fields[6], fields[11]
        name = data[pos + 110: pos + 110 + namesize - 1].decode()
        pos = (pos + 110 + namesize + 3) & ~3
        if name == "TRAILER!!!":
            return files
        files[name] = data[pos: pos + size]
        pos = (pos + size + 3) & ~3


@pytest.fixture(scope="module")
def built():
    return build_image(Recipe())


def test_build_is_verified_and_default(built):
    assert store.default_image_dir() == built.resolve()
    with open_verified(built) as image:
        assert image.manifest["recipe"] == {"suite": "bookworm", "apt": [], "pip": []}
        assert image.kernel.read(5) == b"\x7fELF\x02"                     # vmlinux: booted via PVH
        assert image.initrd.read(4) == b"\x28\xb5\x2f\xfd"                # zstd frame
        image.rootfs.seek(1024)
        assert image.rootfs.read(4) == b"\xe2\xe1\xf5\xe0"                # EROFS superblock magic
        assert image.manifest["kernel_version"].endswith("-cloud-amd64")


def test_second_build_is_instant(built):
    out = io.StringIO()
    t0 = time.monotonic()
    again = build_image(Recipe(), progress=Progress(out=out))
    assert again == built and time.monotonic() - t0 < 10
    assert "using the cached image" in out.getvalue()


def test_initramfs_content(built):
    data = subprocess.run(["zstd", "-dc", str(built / "initrd.img")], capture_output=True, check=True).stdout
    files = read_newc(data)
    from capsem_vm.image.agent_source import find_agent_tree
    assert files["init"] == find_agent_tree().file("init").path.read_bytes()
    assert files["bin/busybox"][:4] == b"\x7fELF"
    assert "capsem/capsem_agent/protocol.py" in files
    order = [line.rsplit("/", 1)[1] for line in files["etc/capsem/modules.boot"].decode().split()]
    for before, after in (("virtio.ko", "virtio_pci.ko"), ("libcrc32c.ko", "erofs.ko"),
                          ("vsock.ko", "vmw_vsock_virtio_transport.ko")):
        assert order.index(before) < order.index(after)
    # VirtioFS loads in the background, after what it shares with the boot modules
    background = [line.rsplit("/", 1)[1] for line in files["etc/capsem/modules.background"].decode().split()]
    # and the balloon (free page reporting: issue 19), which nothing at boot waits for
    assert background == ["fuse.ko", "virtiofs.ko", "virtio_balloon.ko"]
    ver = built.joinpath("manifest.json").read_text().split('"kernel_version": "')[1].split('"')[0]
    assert f"lib/modules/{ver}/modules.dep.bin" in files
    # /init reads these ahead from the root filesystem: the interpreter first, then the stdlib
    # bytecode the agent imports; all of it really is in the rootfs (extension modules may be
    # built into the guest's python3.11, so those may be absent)
    readahead = files["etc/capsem/readahead"].decode().split()
    assert readahead[0] == "usr/bin/python3.11"
    assert "usr/lib/python3.11/asyncio/__pycache__/base_events.cpython-311.pyc" in readahead
    assert not any(p.startswith("/") or ".." in p.split("/") for p in readahead)
    for path in readahead:
        if "/lib-dynload/" not in path:
            out = subprocess.run(["dump.erofs", f"--path=/{path}", str(built / "rootfs.erofs")],
                                 capture_output=True, text=True).stdout
            assert out.startswith("File :"), f"{path} is not in the rootfs"
    assert any(n.endswith("/nft_redir.ko") for n in files)
