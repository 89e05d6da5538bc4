"""Signed image export/import as a plain tar.

The tar holds exactly: manifest.json, manifest.sig (Ed25519 over manifest.json), vmlinuz,
initrd.img, rootfs.erofs. Import checks the signature before anything reaches the store, accepts
only those regular-file members, hashes every asset against the signed manifest while copying,
and installs atomically. Tar extraction helpers (extract/extractall) are never used.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tarfile
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from capsem_vm.errors import AssetVerificationError, ImageError

from . import store
from .manifest import ASSET_FILES, MANIFEST_NAME, MAX_MANIFEST_BYTES, SIGNATURE_NAME, parse_manifest
from .signing import SIGNATURE_SIZE, check_signature, ensure_signing_key, sign
from .verify import open_verified

MAX_ASSET_BYTES = 32 << 30
_ASSET_NAMES = {file: role for role, file in ASSET_FILES.items()}
_EXPECTED = {MANIFEST_NAME, SIGNATURE_NAME, *ASSET_FILES.values()}
_COPY_CHUNK = 4 << 20


def export_image(image_dir: Path, output: Path) -> Path:
    """Verify `image_dir`, sign its manifest with the user's key and write a tar to `output`."""
    key, _ = ensure_signing_key()
    output = Path(output)
    tmp = output.with_name(f".{output.name}.tmp-{os.getpid()}")
    with open_verified(image_dir) as image:
        data = image.manifest_bytes
        try:
            with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar:
                _add_bytes(tar, MANIFEST_NAME, data)
                _add_bytes(tar, SIGNATURE_NAME, sign(key, data))
                for role, f in (("kernel", image.kernel), ("initrd", image.initrd), ("rootfs", image.rootfs)):
                    info = tarfile.TarInfo(ASSET_FILES[role])
                    info.size = image.manifest["assets"][role]["size"]
                    info.mode = 0o644
                    f.seek(0)
                    tar.addfile(info, f)
            os.replace(tmp, output)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    return output


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    import io
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(data))


def _reject(path: Path, why: str) -> ImageError:
    return ImageError(f"refusing to import {path}: {why}",
                      "only import tars made by `capsem image export`; nothing was installed")


def _members(tar: tarfile.TarFile, path: Path) -> dict[str, tarfile.TarInfo]:
    """Exactly the expected names, once each, all plain regular files within size bounds."""
    members: dict[str, tarfile.TarInfo] = {}
    while True:
        try:
            m = tar.next()
        except tarfile.TarError as e:
            raise _reject(path, f"corrupt tar: {e}")
        if m is None:
            break
        if "/" in m.name or "\\" in m.name or ".." in m.name or m.name not in _EXPECTED:
            raise _reject(path, f"unexpected member {m.name!r}")
        if m.type not in (tarfile.REGTYPE, tarfile.AREGTYPE) or m.sparse is not None:
            raise _reject(path, f"member {m.name!r} is not a regular file (links and devices are refused)")
        if m.name in members:
            raise _reject(path, f"member {m.name!r} appears twice")
        limit = {MANIFEST_NAME: MAX_MANIFEST_BYTES, SIGNATURE_NAME: SIGNATURE_SIZE}.get(m.name, MAX_ASSET_BYTES)
        if not 0 < m.size <= limit or (m.name == SIGNATURE_NAME and m.size != SIGNATURE_SIZE):
            raise _reject(path, f"member {m.name!r} has an implausible size {m.size}")
        members[m.name] = m
    missing = _EXPECTED - set(members)
    if missing:
        raise _reject(path, f"missing members {sorted(missing)}")
    return members


def import_image(tar_path: Path, trusted: Ed25519PublicKey, name: str | None = None) -> Path:
    """Check signature, members and hashes; then install into the store. Returns the image dir."""
    tar_path = Path(tar_path)
    try:
        tar = tarfile.open(tar_path, "r:")
    except (OSError, tarfile.TarError) as e:
        raise _reject(tar_path, f"cannot open as a tar: {e}")
    with tar:
        members = _members(tar, tar_path)
        data = tar.extractfile(members[MANIFEST_NAME]).read(MAX_MANIFEST_BYTES + 1)
        signature = tar.extractfile(members[SIGNATURE_NAME]).read(SIGNATURE_SIZE + 1)
        check_signature(trusted, data, signature, f"image {tar_path}")
        # Only now, with an authentic manifest, is its content trusted enough to parse.
        manifest = parse_manifest(data, f"{tar_path}:{MANIFEST_NAME}")
        for file, role in _ASSET_NAMES.items():
            if members[file].size != manifest["assets"][role]["size"]:
                raise _reject(tar_path, f"{file} is {members[file].size} bytes, the signed manifest says "
                                        f"{manifest['assets'][role]['size']}")
        dest_name = store.check_name(name or manifest.get("image_key") or
                                     "imported-" + hashlib.sha256(data).hexdigest()[:16])
        if dest_name == store.DEFAULT:
            raise ImageError("`default` is reserved for the image built from the default recipe",
                             "pass another --name")
        tmp = store.new_temp_dir(store.images_dir(), dest_name)
        try:
            for file, role in _ASSET_NAMES.items():
                _copy_verified(tar, members[file], tmp / file, manifest["assets"][role]["sha256"])
            (tmp / MANIFEST_NAME).write_bytes(data)
            (tmp / SIGNATURE_NAME).write_bytes(signature)
            with open_verified(tmp):  # the installed bytes, checked once more through fresh fds
                pass
            return store.install_dir(tmp, store.images_dir() / dest_name)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


def _copy_verified(tar: tarfile.TarFile, member: tarfile.TarInfo, dest: Path, expected: str) -> None:
    src = tar.extractfile(member)
    h = hashlib.sha256()
    fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
    with os.fdopen(fd, "wb") as out:
        while chunk := src.read(_COPY_CHUNK):
            h.update(chunk)
            out.write(chunk)
    if h.hexdigest() != expected:
        raise AssetVerificationError(f"{member.name} (in the imported tar)", expected, h.hexdigest(),
                                     hint="the tar was altered after signing; nothing was installed")
