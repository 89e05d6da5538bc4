"""`capsem doctor`: check this host can run capsem VMs and say what to fix."""

from __future__ import annotations

import subprocess
from collections.abc import Callable

from . import accel, helpers
from .errors import CapsemError
from .vsock.base import vhost_vsock_usable

Check = tuple[str, Callable[[], str]]  # (name, fn returning a detail; raises CapsemError on failure)


def add_parser(sub) -> None:
    p = sub.add_parser("doctor", help="check QEMU, accelerator, helpers and image",
                       description="Check that this host can run capsem VMs; print what to fix.")
    p.add_argument("--security", action="store_true",
                   help="print this host's security posture (accelerator, seccomp, helper privileges, "
                        "policy default, CA key); exit non-zero if a setting is weak")
    p.set_defaults(func=cmd_doctor)


def _qemu() -> str:
    prog = helpers.qemu()
    out = subprocess.run([str(prog.path), "--version"], capture_output=True, text=True, timeout=20)
    version = out.stdout.splitlines()[0] if out.stdout else "unknown version"
    devices = subprocess.run([str(prog.path), "-device", "help"], capture_output=True, text=True, timeout=20).stdout
    missing = [d for d in ("vhost-user-fs-pci", "vhost-user-vsock-pci", "virtio-blk-pci") if f'"{d}"' not in devices]
    if missing:
        raise CapsemError(f"{prog.path} lacks devices: {', '.join(missing)}", "install Debian's qemu-system-x86 (7.2 or later)")
    return f"{prog.path} ({version})"


def _accel() -> str:
    choice = accel.choose("auto")
    return f"{choice.accel}: {choice.reason}"


def _vsock() -> str:
    if vhost_vsock_usable():
        return "kernel vhost-vsock (/dev/vhost-vsock)"
    prog = helpers.vhost_device_vsock()
    return f"vhost-user via {prog.path} (/dev/vhost-vsock not usable)"


def _virtiofsd() -> str:
    prog = helpers.virtiofsd()
    return f"{prog.path} ({prog.dialect} dialect)"


def _image() -> str:
    from .image.store import default_image_dir
    from .image.verify import open_verified

    image_dir = default_image_dir()
    with open_verified(image_dir) as image:
        return f"{image_dir} (verified, manifest sha256 {image.digest[:16]}...)"


CHECKS: list[Check] = [
    ("qemu", _qemu),
    ("accelerator", _accel),
    ("vsock", _vsock),
    ("virtiofsd", _virtiofsd),
    ("image", _image),
]


def cmd_doctor(args) -> int:
    if getattr(args, "security", False):
        from . import posture
        return posture.report()
    failed = 0
    for name, fn in CHECKS:
        try:
            detail = fn()
            print(f"  ok    {name:12} {detail}")
        except CapsemError as exc:
            failed += 1
            print(f"  FAIL  {name:12} {exc.message}")
            if exc.hint:
                print(f"        {'':12} fix: {exc.hint}")
        except Exception as exc:  # a check must never crash the report
            failed += 1
            print(f"  FAIL  {name:12} {exc.__class__.__name__}: {exc}")
    print("all checks passed" if not failed else f"{failed} check(s) failed; `capsem setup --dry-run` shows what "
          "`capsem setup` would install (as root: for everyone)")
    return 1 if failed else 0
