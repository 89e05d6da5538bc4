"""Facts of this checkout and host for tests (no tests here): the repository root, the capsem CLI as
a command, and the live capsem helper processes (QEMU, virtiofsd, vhost-device-vsock)."""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CAPSEM = [sys.executable, "-m", "capsem_vm.cli"]
HELPER_NAMES = ("qemu-system-x86_64", "virtiofsd", "vhost-device-vsock")


def helper_processes(*markers: str) -> list[str]:
    """Live capsem helper processes (QEMU, virtiofsd, vhost-device-vsock) as "pid cmdline".

    With markers, only those whose command line mentions one of them (a runtime dir, a share path):
    other engineers' or tests' VMs on the same machine must not count.
    """
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            args = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if state == "Z" or not args:
            continue
        if not any(name in args.split(" ", 1)[0] for name in HELPER_NAMES):
            continue
        if "qemu-system" in args and "capsem" not in args:
            continue
        if markers and not any(m in args for m in markers):
            continue
        found.append(f"{entry.name} {args}")
    return sorted(found)
