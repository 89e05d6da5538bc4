"""Manifest creation and verification of image directories with small fake assets."""

import json
import os

import pytest

from capsem_vm.errors import AssetVerificationError, ImageError
from capsem_vm.image.manifest import ASSET_FILES, MANIFEST_NAME, write_manifest_for
from capsem_vm.image.verify import check_image, open_verified


@pytest.fixture
def image(tmp_path):
    d = tmp_path / "img"
    d.mkdir()
    for i, name in enumerate(ASSET_FILES.values()):
        (d / name).write_bytes(os.urandom(1000 + i) + name.encode())
    write_manifest_for(d, kernel_version="6.1.0-test", recipe={"suite": "bookworm", "apt": [], "pip": []})
    return d


def edit_manifest(d, change):
    m = json.loads((d / MANIFEST_NAME).read_text())
    change(m)
    (d / MANIFEST_NAME).write_text(json.dumps(m))


def test_good_image_verifies_and_files_are_the_hashed_ones(image):
    with open_verified(image) as v:
        assert v.manifest["kernel_version"] == "6.1.0-test"
        assert set(v.paths) == {"kernel", "initrd", "rootfs"}
        assert v.kernel.read() == (image / "vmlinuz").read_bytes()
        assert v.rootfs.read(4) == (image / "rootfs.erofs").read_bytes()[:4]
        import hashlib
        assert v.digest == hashlib.sha256((image / MANIFEST_NAME).read_bytes()).hexdigest()
        fds = [v.kernel.fileno(), v.initrd.fileno(), v.rootfs.fileno()]
    for fd in fds:  # closed by the context manager
        with pytest.raises(OSError):
            os.fstat(fd)


def test_flipped_byte_fails_naming_file_and_hashes(image):
    path = image / "initrd.img"
    data = bytearray(path.read_bytes())
    data[500] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(AssetVerificationError) as e:
        open_verified(image)
    assert "initrd" in str(e.value) and e.value.expected.split()[0] != e.value.actual.split()[0]
    result = check_image(image)
    result.close()
    assert not result.ok and [c.name for c in result.checks if not c.ok] == ["initrd"]


def test_truncated_asset_fails(image):
    path = image / "rootfs.erofs"
    path.write_bytes(path.read_bytes()[:-1])
    with pytest.raises(AssetVerificationError, match="rootfs"):
        open_verified(image)


def test_swapped_kernel_and_initrd_fail(image):
    k, i = image / "vmlinuz", image / "initrd.img"
    tmp = image / "swap"
    os.rename(k, tmp)
    os.rename(i, k)
    os.rename(tmp, i)
    with pytest.raises(AssetVerificationError):
        open_verified(image)
    result = check_image(image)
    result.close()
    assert {c.name for c in result.checks if not c.ok} == {"kernel", "initrd"}


def test_missing_asset_fails(image):
    (image / "vmlinuz").unlink()
    with pytest.raises(ImageError, match="vmlinuz.*missing"):
        open_verified(image)


def test_symlinked_asset_is_refused(image, tmp_path):
    real = tmp_path / "elsewhere"
    os.rename(image / "vmlinuz", real)
    os.symlink(real, image / "vmlinuz")
    with pytest.raises(ImageError, match="vmlinuz"):
        open_verified(image)


def test_missing_manifest_fails(image):
    (image / MANIFEST_NAME).unlink()
    with pytest.raises(ImageError, match="no manifest.json"):
        open_verified(image)


def test_malformed_json_fails(image):
    (image / MANIFEST_NAME).write_text('{"format": 1, "assets": ')
    with pytest.raises(ImageError, match="not valid JSON"):
        open_verified(image)


@pytest.mark.parametrize("change, message", [
    (lambda m: m["assets"].update(extra={"file": "x", "sha256": "0" * 64, "size": 1}), "exactly"),
    (lambda m: m["assets"].pop("rootfs"), "exactly"),
    (lambda m: m.update(surprise=True), "unknown fields"),
    (lambda m: m.pop("kernel_version"), "missing fields"),
    (lambda m: m["assets"]["kernel"].update(file="../../etc/passwd"), "must be file"),
    (lambda m: m["assets"]["kernel"].update(sha256="xyz"), "invalid sha256"),
    (lambda m: m["assets"]["kernel"].update(size=-1), "invalid size"),
    (lambda m: m["assets"]["kernel"].update(extra=1), "exactly file, sha256, size"),
    (lambda m: m.update(format=99), "format 99"),
    (lambda m: m.update(assets=[]), "assets is not an object"),
])
def test_bad_manifest_entries_fail(image, change, message):
    edit_manifest(image, change)
    with pytest.raises(ImageError, match=message):
        open_verified(image)


def test_manifest_that_is_not_an_object_fails(image):
    (image / MANIFEST_NAME).write_text("[1, 2]")
    with pytest.raises(ImageError, match="not a JSON object"):
        open_verified(image)


def test_replacing_file_after_verification_does_not_change_what_is_read(image):
    original = (image / "vmlinuz").read_bytes()
    with open_verified(image) as v:
        os.rename(image / "initrd.img", image / "vmlinuz")  # swap the path under the open fd
        assert v.kernel.read() == original
