"""manifest.json: which files make an image and what their bytes must hash to.

Strict on read: the manifest decides what QEMU boots, so unknown or missing entries are errors.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

from capsem_vm.errors import ImageError

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
SIGNATURE_NAME = "manifest.sig"
MAX_MANIFEST_BYTES = 1 << 20

# Asset role -> the only file name it may have (fixed names: a manifest can't point elsewhere).
# "vmlinuz" is the kernel QEMU boots; since builder 3 that is the uncompressed ELF kernel (PVH
# direct boot, see linux.py), older images have the bzImage; QEMU boots either.
ASSET_FILES = {"kernel": "vmlinuz", "initrd": "initrd.img", "rootfs": "rootfs.erofs"}
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_REQUIRED = {"format", "created", "kernel_version", "recipe", "assets"}
_OPTIONAL = {"image_key", "layers", "builder_version", "kernel_package", "busybox", "initrd_compression"}


def asset_entry(name: str, sha256: str, size: int) -> dict:
    return {"file": ASSET_FILES[name], "sha256": sha256, "size": size}


def make_manifest(*, assets: dict[str, dict], kernel_version: str, recipe: dict, **extra) -> dict:
    manifest = {
        "format": FORMAT_VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "kernel_version": kernel_version,
        "recipe": recipe,
        "assets": assets,
        **extra,
    }
    validate_manifest(manifest, "new manifest")
    return manifest


def dump_manifest(manifest: dict) -> bytes:
    return (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode()


def parse_manifest(data: bytes, where: str | Path) -> dict:
    """Parse and validate manifest bytes; `where` names the file in errors."""
    hint = "rebuild the image with `capsem image build` or re-import a trusted copy"
    if len(data) > MAX_MANIFEST_BYTES:
        raise ImageError(f"manifest {where} is too large ({len(data)} bytes)", hint)
    try:
        manifest = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ImageError(f"manifest {where} is not valid JSON: {e}", hint)
    validate_manifest(manifest, where)
    return manifest


def validate_manifest(manifest, where) -> None:
    hint = "rebuild the image with `capsem image build` or re-import a trusted copy"

    def bad(why):
        raise ImageError(f"manifest {where} is malformed: {why}", hint)

    if not isinstance(manifest, dict):
        bad("not a JSON object")
    missing = _REQUIRED - set(manifest)
    if missing:
        bad(f"missing fields {sorted(missing)}")
    unknown = set(manifest) - _REQUIRED - _OPTIONAL
    if unknown:
        bad(f"unknown fields {sorted(unknown)}")
    if manifest["format"] != FORMAT_VERSION:
        raise ImageError(f"manifest {where} has format {manifest['format']!r}, this capsem reads "
                         f"format {FORMAT_VERSION}", "rebuild the image with this capsem version")
    if not isinstance(manifest["kernel_version"], str) or not isinstance(manifest["recipe"], dict):
        bad("kernel_version must be a string and recipe an object")
    assets = manifest["assets"]
    if not isinstance(assets, dict):
        bad("assets is not an object")
    if set(assets) != set(ASSET_FILES):
        bad(f"assets must be exactly {sorted(ASSET_FILES)}, found {sorted(assets)}")
    for name, entry in assets.items():
        if not isinstance(entry, dict) or set(entry) != {"file", "sha256", "size"}:
            bad(f"asset {name!r} must have exactly file, sha256, size")
        if entry["file"] != ASSET_FILES[name]:
            bad(f"asset {name!r} must be file {ASSET_FILES[name]!r}, not {entry['file']!r}")
        if not isinstance(entry["sha256"], str) or not _SHA256.match(entry["sha256"]):
            bad(f"asset {name!r} has an invalid sha256")
        size = entry["size"]
        if not isinstance(size, int) or isinstance(size, bool) or size <= 0:
            bad(f"asset {name!r} has an invalid size")


def write_manifest_for(image_dir: Path, *, kernel_version: str, recipe: dict, **extra) -> dict:
    """Hash the three asset files already in `image_dir` and write its manifest.json."""
    from .hashing import sha256_file

    assets = {}
    for name, file in ASSET_FILES.items():
        sha, size = sha256_file(Path(image_dir) / file)
        assets[name] = asset_entry(name, sha, size)
    manifest = make_manifest(assets=assets, kernel_version=kernel_version, recipe=recipe, **extra)
    (Path(image_dir) / MANIFEST_NAME).write_bytes(dump_manifest(manifest))
    return manifest
