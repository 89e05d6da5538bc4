"""`capsem image build`: assemble an image from its three cached layers.

Keys (see recipe.py / initramfs.py):
  image key     = recipe's rootfs key + local initramfs inputs (computable offline: a repeat
                  build is instant, no network)
  rootfs key    = builder version + suite + package set + pip set (mirror-independent)
  kernel key    = the versioned kernel package (resolved from the Debian archive)
  initramfs key = init script + agent sources + busybox + module lists + kernel key
"""

from __future__ import annotations

import shutil
from pathlib import Path

from capsem_vm import paths
from capsem_vm.errors import ImageError

from . import store
from .debian import PrivateApt, host_mirrors
from .initramfs import COMPRESSION, ensure_initramfs, initramfs_key, local_inputs_digest
from .linux import ensure_kernel
from .manifest import ASSET_FILES, write_manifest_for
from .progress import Progress
from .recipe import BUILDER_VERSION, Recipe, digest_of
from .rootfs import build_mode, cached_rootfs, ensure_rootfs
from .verify import read_manifest


def image_key(recipe: Recipe) -> str:
    return digest_of({"builder": BUILDER_VERSION, "rootfs": recipe.rootfs_key(),
                      "initramfs_inputs": local_inputs_digest()})[:24]


def cached_image(recipe: Recipe) -> Path | None:
    """This recipe's image, built: the user's own, else (read only) the one root built for everyone."""
    key = image_key(recipe)
    for root in dict.fromkeys((store.images_dir(), paths.system_cache_dir() / "images")):
        try:
            read_manifest(root / key)
        except ImageError:
            continue
        return root / key
    return None


def build_image(recipe: Recipe, *, verbose: bool = False, refresh: bool = False,
                progress: Progress | None = None) -> Path:
    """Build (or reuse) the image for `recipe`; returns its directory."""
    key = image_key(recipe)
    image_dir = store.images_dir() / key
    own_progress = progress is None
    if own_progress:
        log = paths.cache_dir() / "logs" / f"build-{key}.log"
        progress = Progress(verbose=verbose, log_path=log)
    try:
        cached = None if refresh else cached_image(recipe)
        if cached:
            image_dir = cached
            progress.say(f"using the cached image {image_dir} (rebuild with --refresh)")
        else:
            _build(recipe, key, image_dir, progress, refresh)
        if recipe.is_default:
            # the system's image is named by its absolute path in the user's store
            store.set_default(key if image_dir.parent == store.images_dir() else str(image_dir))
        return image_dir
    finally:
        if own_progress:
            progress.close()


def _build(recipe: Recipe, key: str, image_dir: Path, progress: Progress, refresh: bool) -> None:
    for parent in (store.images_dir(), *(store.layers_dir(k) for k in ("kernel", "initramfs", "rootfs"))):
        store.clean_stale_temps(parent)
    if refresh or not cached_rootfs(recipe):
        build_mode()  # a user who cannot build the rootfs learns it now, not after the kernel
    mirrors = host_mirrors()
    apt = PrivateApt(paths.cache_dir() / "apt", mirrors, recipe.suite, progress.run)
    with progress.stage(f"apt: update package lists ({mirrors.main})"):
        apt.update()
    kernel = ensure_kernel(apt, progress)
    initrd = ensure_initramfs(kernel, progress)
    rootfs = ensure_rootfs(recipe, mirrors, progress, refresh=refresh)

    with progress.stage("image: link assets, hash, write manifest"):
        tmp = store.new_temp_dir(store.images_dir(), key)
        try:
            sources = {"kernel": kernel.vmlinux, "initrd": initrd, "rootfs": rootfs}
            for name, src in sources.items():
                store.link_or_copy(src, tmp / ASSET_FILES[name])
            manifest = write_manifest_for(
                tmp, kernel_version=kernel.version, recipe=recipe.to_json(),
                image_key=key, builder_version=BUILDER_VERSION, kernel_package=kernel.package,
                initrd_compression=COMPRESSION,
                layers={"kernel": kernel.key, "initramfs": initramfs_key(kernel),
                        "rootfs": recipe.rootfs_key()},
            )
            store.install_dir(tmp, image_dir)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    sizes = ", ".join(f"{n} {a['size'] / 1e6:.1f} MB" for n, a in manifest["assets"].items())
    progress.say(f"image ready: {image_dir} ({sizes}; total {progress.elapsed():.0f}s)")


