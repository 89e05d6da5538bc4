"""The VM image: building the three assets (kernel, initramfs, EROFS rootfs), their manifest,
verification, and signed export/import.

Public entry points for the VM runner:
    capsem_vm.image.store.default_image_dir()    -> Path
    capsem_vm.image.store.resolve_image(name)     -> Path
    capsem_vm.image.verify.open_verified(dir)     -> VerifiedImage (context manager)
"""
