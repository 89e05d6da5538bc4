"""`capsem image ...` sub-commands. The main CLI calls add_parser(subparsers); each sub-command
sets func(args) -> exit code. Also runnable alone: python -m capsem_vm.image.cli ..."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def add_parser(subparsers) -> argparse.ArgumentParser:
    image = subparsers.add_parser("image", help="build, verify, export and import VM images")
    sub = image.add_subparsers(dest="image_command", metavar="COMMAND", required=True)

    p = sub.add_parser("build", help="build the VM image (cached by recipe)")
    p.add_argument("--apt", action="append", default=[], metavar="PKG", help="extra Debian package (repeatable)")
    p.add_argument("--pip", action="append", default=[], metavar="REQ", help="extra pip requirement (repeatable)")
    p.add_argument("--recipe", type=Path, metavar="FILE", help="TOML recipe: apt = [...], pip = [...]")
    p.add_argument("--refresh", action="store_true",
                   help="rebuild even if cached (fetches the current kernel and packages)")
    p.add_argument("-v", "--verbose", action="store_true", help="show the build tools' output")
    p.set_defaults(func=cmd_build)

    for name, helptext in (("verify", "hash every asset and compare with the manifest"),
                           ("info", "show an image's manifest and verify it")):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("image", nargs="?", metavar="IMAGE", help="image name or directory (default: default)")
        p.set_defaults(func=cmd_verify, show_info=(name == "info"))

    p = sub.add_parser("list", help="list stored images")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("export", help="write a signed tar of an image")
    p.add_argument("image", metavar="IMAGE", help="image name or directory ('default' for the default)")
    p.add_argument("-o", "--output", type=Path, required=True, metavar="FILE.tar")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("import", help="verify a signed image tar and add it to the store")
    p.add_argument("file", type=Path, metavar="FILE.tar")
    p.add_argument("--trust", required=True, metavar="PUBKEY",
                   help="the signer's public key: a PEM file, or its raw base64 (from `capsem image key`)")
    p.add_argument("--name", help="store the image under this name (default: its image key)")
    p.set_defaults(func=cmd_import)

    p = sub.add_parser("key", help="show your image signing public key (created on first use)")
    p.set_defaults(func=cmd_key)
    return image


def cmd_build(args) -> int:
    from .build import build_image
    from .recipe import make_recipe
    recipe = make_recipe(apt=args.apt, pip=args.pip, recipe_file=args.recipe)
    image_dir = build_image(recipe, verbose=args.verbose, refresh=args.refresh)
    print(image_dir)
    return 0


def cmd_verify(args) -> int:
    from .store import resolve_image
    from .verify import check_image
    image_dir = resolve_image(args.image)
    t0 = time.perf_counter()
    result = check_image(image_dir)
    elapsed = time.perf_counter() - t0
    result.close()
    manifest, digest, checks = result.manifest, result.digest, result.checks
    print(f"image      {image_dir}")
    print(f"identity   sha256:{digest} (manifest.json)")
    if args.show_info:
        recipe = manifest["recipe"]
        print(f"kernel     {manifest['kernel_version']} ({manifest.get('kernel_package', '?')})")
        print(f"recipe     suite={recipe.get('suite')} apt={recipe.get('apt', [])} pip={recipe.get('pip', [])}")
        print(f"created    {manifest['created']}")
        for k in ("image_key", "initrd_compression", "builder_version"):
            if k in manifest:
                print(f"{k:<10} {manifest[k]}")
    total = 0
    for c in checks:
        status = "OK  " if c.ok else "FAIL"
        print(f"{status} {c.name:<7} {c.path.name:<13} {c.expected_size:>11} bytes  sha256 {c.expected_sha256}"
              f"  ({c.seconds * 1000:.0f} ms)")
        if not c.ok:
            print(f"       {c.problem()}")
        total += c.actual_size or 0
    ok = result.ok
    rate = total / elapsed / 1e6 if elapsed > 0 else 0
    print(f"{'verified' if ok else 'VERIFICATION FAILED'}: {total / 1e6:.1f} MB hashed in "
          f"{elapsed * 1000:.0f} ms ({rate:.0f} MB/s)")
    return 0 if ok else 1


def cmd_list(args) -> int:
    from .store import DEFAULT, images_dir, list_images
    default = images_dir() / DEFAULT
    target = default.resolve().name if default.is_symlink() else None
    for name in list_images():
        if name != DEFAULT:
            print(f"{name}{'  (default)' if name == target else ''}")
    return 0


def cmd_export(args) -> int:
    from .store import resolve_image
    from .transfer import export_image
    out = export_image(resolve_image(args.image), args.output)
    print(f"exported {out}")
    return 0


def cmd_import(args) -> int:
    from .signing import load_trusted_key
    from .transfer import import_image
    image_dir = import_image(args.file, load_trusted_key(args.trust), name=args.name)
    print(f"imported {image_dir}")
    return 0


def cmd_key(args) -> int:
    from .signing import ensure_signing_key, public_key_b64
    key, pub_path = ensure_signing_key()
    print(f"public key file: {pub_path}")
    print(f"public key (base64): {public_key_b64(key.public_key())}")
    print("importers pass either to `capsem image import FILE.tar --trust ...`")
    return 0


def main(argv: list[str] | None = None) -> int:
    from ..cli import group_main
    return group_main(add_parser, argv)


if __name__ == "__main__":
    sys.exit(main())
