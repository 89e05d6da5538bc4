"""Signed export/import round trip and every way an import must be refused."""

import io
import os
import stat
import tarfile

import pytest

from capsem_vm.errors import AssetVerificationError, ImageError
from capsem_vm.image import store
from capsem_vm.image.manifest import ASSET_FILES, MANIFEST_NAME, write_manifest_for
from capsem_vm.image.signing import ensure_signing_key, load_trusted_key, public_key_b64
from capsem_vm.image.transfer import export_image, import_image
from capsem_vm.image.verify import open_verified


@pytest.fixture(autouse=True)
def private_dirs(tmp_path, monkeypatch):
    monkeypatch.setenv("CAPSEM_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("CAPSEM_DATA_DIR", str(tmp_path / "data"))


@pytest.fixture
def image(tmp_path):
    d = tmp_path / "src-image"
    d.mkdir()
    for name in ASSET_FILES.values():
        (d / name).write_bytes(os.urandom(3000) + name.encode())
    write_manifest_for(d, kernel_version="6.1.0-test", recipe={"suite": "bookworm", "apt": [], "pip": []},
                       image_key="abc123")
    return d


@pytest.fixture
def exported(image, tmp_path):
    return export_image(image, tmp_path / "img.tar")


def trusted():
    key, pub_path = ensure_signing_key()
    return load_trusted_key(str(pub_path))


def store_is_empty():
    return store.list_images() == [] and not any(
        p for p in store.images_dir().glob("*") if not p.name.startswith(".old-"))


def rewrite_tar(src, dst, change):
    """Copy a tar member by member, letting `change(info, data)` return replacement members."""
    with tarfile.open(src) as tin, tarfile.open(dst, "w", format=tarfile.PAX_FORMAT) as tout:
        for info in tin.getmembers():
            data = tin.extractfile(info).read() if info.isreg() else b""
            for new_info, new_data in change(info, data):
                tout.addfile(new_info, io.BytesIO(new_data) if new_info.isreg() else None)
    return dst


def test_key_is_private_and_stable(tmp_path):
    key1, pub = ensure_signing_key()
    key2, _ = ensure_signing_key()
    assert public_key_b64(key1.public_key()) == public_key_b64(key2.public_key())
    key_file = pub.with_name("ed25519.key")
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(key_file.parent.stat().st_mode) == 0o700


def test_round_trip_with_pem_and_base64_keys(exported, image):
    installed = import_image(exported, trusted())
    assert installed == store.images_dir() / "abc123"
    with open_verified(installed) as v:
        assert v.kernel.read() == (image / "vmlinuz").read_bytes()
        assert (installed / MANIFEST_NAME).read_bytes() == (image / MANIFEST_NAME).read_bytes()
    key, _ = ensure_signing_key()
    again = import_image(exported, load_trusted_key(public_key_b64(key.public_key())), name="copy")
    assert again.name == "copy" and store.resolve_image("copy") == again


def test_export_refuses_a_corrupt_image(image, tmp_path):
    (image / "vmlinuz").write_bytes(b"evil")
    with pytest.raises(ImageError):
        export_image(image, tmp_path / "x.tar")
    assert not (tmp_path / "x.tar").exists()


def test_other_key_is_rejected(exported, tmp_path):
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    other = Ed25519PrivateKey.generate().public_key()
    with pytest.raises(ImageError, match="signature does not match"):
        import_image(exported, other)
    assert store_is_empty()


def test_bad_signature_is_rejected(exported, tmp_path):
    def flip_sig(info, data):
        if info.name == "manifest.sig":
            data = bytes([data[0] ^ 1]) + data[1:]
        yield info, data
    bad = rewrite_tar(exported, tmp_path / "bad.tar", flip_sig)
    with pytest.raises(ImageError, match="signature does not match"):
        import_image(bad, trusted())
    assert store_is_empty()


def test_edited_manifest_is_rejected(exported, tmp_path):
    def edit(info, data):
        if info.name == MANIFEST_NAME:
            data = data.replace(b"6.1.0-test", b"6.1.0-evil")
            info.size = len(data)
        yield info, data
    bad = rewrite_tar(exported, tmp_path / "bad.tar", edit)
    with pytest.raises(ImageError, match="signature does not match"):
        import_image(bad, trusted())
    assert store_is_empty()


def test_tampered_asset_is_rejected(exported, tmp_path):
    def tamper(info, data):
        if info.name == "rootfs.erofs":
            data = data[:100] + bytes([data[100] ^ 0xFF]) + data[101:]
        yield info, data
    bad = rewrite_tar(exported, tmp_path / "bad.tar", tamper)
    with pytest.raises(AssetVerificationError, match="rootfs.erofs"):
        import_image(bad, trusted())
    assert store_is_empty()


def test_resized_asset_is_rejected(exported, tmp_path):
    def grow(info, data):
        if info.name == "vmlinuz":
            data += b"x"
            info.size = len(data)
        yield info, data
    bad = rewrite_tar(exported, tmp_path / "bad.tar", grow)
    with pytest.raises(ImageError, match="signed manifest says"):
        import_image(bad, trusted())
    assert store_is_empty()


def test_symlink_member_is_rejected(exported, tmp_path):
    def symlink(info, data):
        if info.name == "initrd.img":
            link = tarfile.TarInfo("initrd.img")
            link.type = tarfile.SYMTYPE
            link.linkname = "/etc/passwd"
            yield link, b""
        else:
            yield info, data
    bad = rewrite_tar(exported, tmp_path / "bad.tar", symlink)
    with pytest.raises(ImageError, match="not a regular file"):
        import_image(bad, trusted())
    assert store_is_empty()


def test_hardlink_member_is_rejected(exported, tmp_path):
    def hardlink(info, data):
        if info.name == "initrd.img":
            link = tarfile.TarInfo("initrd.img")
            link.type = tarfile.LNKTYPE
            link.linkname = "vmlinuz"
            yield link, b""
        else:
            yield info, data
    bad = rewrite_tar(exported, tmp_path / "bad.tar", hardlink)
    with pytest.raises(ImageError, match="not a regular file"):
        import_image(bad, trusted())
    assert store_is_empty()


@pytest.mark.parametrize("evil_name", ["../vmlinuz", "sub/vmlinuz", "/vmlinuz", "..", "notes.txt"])
def test_unexpected_or_traversal_member_is_rejected(exported, tmp_path, evil_name):
    def add(info, data):
        yield info, data
        if info.name == "vmlinuz":
            extra = tarfile.TarInfo(evil_name)
            extra.size = 4
            yield extra, b"evil"
    bad = rewrite_tar(exported, tmp_path / "bad.tar", add)
    with pytest.raises(ImageError, match="unexpected member"):
        import_image(bad, trusted())
    assert store_is_empty()
    assert not (tmp_path / "vmlinuz").exists()


def test_duplicate_member_is_rejected(exported, tmp_path):
    def dup(info, data):
        yield info, data
        if info.name == "vmlinuz":
            yield info, data
    bad = rewrite_tar(exported, tmp_path / "bad.tar", dup)
    with pytest.raises(ImageError, match="appears twice"):
        import_image(bad, trusted())


def test_missing_member_is_rejected(exported, tmp_path):
    def drop(info, data):
        if info.name != "rootfs.erofs":
            yield info, data
    bad = rewrite_tar(exported, tmp_path / "bad.tar", drop)
    with pytest.raises(ImageError, match="missing members"):
        import_image(bad, trusted())


def test_not_a_tar_is_rejected(tmp_path):
    junk = tmp_path / "junk.tar"
    junk.write_bytes(os.urandom(2048))
    with pytest.raises(ImageError, match="refusing to import"):
        import_image(junk, trusted())


def test_bad_trust_argument(tmp_path):
    with pytest.raises(ImageError, match="neither a PEM"):
        load_trusted_key("not-a-key")
    f = tmp_path / "k.pem"
    f.write_text("-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n")
    with pytest.raises(ImageError, match="cannot read public key"):
        load_trusted_key(str(f))


def test_cli_export_import_key(image, tmp_path, capsys):
    from capsem_vm.image.cli import main
    assert main(["image", "key"]) == 0
    b64 = capsys.readouterr().out.split("public key (base64): ")[1].split()[0]
    out = tmp_path / "cli.tar"
    assert main(["image", "export", str(image), "-o", str(out)]) == 0
    assert main(["image", "import", str(out), "--trust", b64, "--name", "fromcli"]) == 0
    assert main(["image", "verify", "fromcli"]) == 0
    assert "OK   kernel" in capsys.readouterr().out
    (store.images_dir() / "fromcli" / "initrd.img").write_bytes(b"x")
    assert main(["image", "info", "fromcli"]) == 1
    assert "FAIL initrd" in capsys.readouterr().out
