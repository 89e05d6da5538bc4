"""Trim a built root filesystem: run by the rootfs build (an mmdebstrap customize hook) as

    python3 trim.py ROOT [--force PKG...] [--unneeded PKG...] [--keep PKG...]

--force     purged even though installed packages depend on them (build-time-only packages that
            Debian makes hard dependencies; the guest has no apt lists, so dpkg's record of unmet
            dependencies does no harm).
--unneeded  purged when, after that, no remaining package needs them (directly or through other
            packages that stay): e.g. the C toolchain, which only the forced ones pulled in.
--keep      never purged (what the recipe asked for explicitly).

Standalone (stdlib only): it runs with the host's Python, possibly inside mmdebstrap's user
namespace, and reads ROOT/var/lib/dpkg/status itself.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from pathlib import Path


def parse_status(text: str) -> dict[str, dict]:
    """Installed packages: name -> {"depends": [[alternative, ...], ...], "provides": [names]}."""
    installed = {}
    for block in text.split("\n\n"):
        fields = {}
        key = None
        for line in block.splitlines():
            if line[:1] in (" ", "\t"):
                if key:
                    fields[key] += " " + line.strip()
                continue
            key, _, value = line.partition(":")
            fields[key] = value.strip()
        name = fields.get("Package")
        if not name or fields.get("Status", "").split()[-1:] != ["installed"]:
            continue
        depends = []
        for field in ("Pre-Depends", "Depends"):
            for group in filter(None, (g.strip() for g in fields.get(field, "").split(","))):
                depends.append([_name(alt) for alt in group.split("|") if alt.strip()])
        provides = [_name(p) for p in fields.get("Provides", "").split(",") if p.strip()]
        installed[name] = {"depends": depends, "provides": provides}
    return installed


def _name(dep: str) -> str:
    """'libc6 (>= 2.34)' or 'python3:any' -> the package name."""
    return re.split(r"[\s(:]", dep.strip(), maxsplit=1)[0]


def unneeded(installed: dict[str, dict], candidates, keep=()) -> list[str]:
    """The candidates that no remaining package needs (Depends/Pre-Depends, through Provides)."""
    candidates = set(candidates) & set(installed)
    candidates -= set(keep)
    providers: dict[str, list[str]] = {}
    for name, info in installed.items():
        for virtual in [name, *info["provides"]]:
            providers.setdefault(virtual, []).append(name)
    needed: set[str] = set()
    stack = [n for n in installed if n not in candidates]
    seen = set(stack)
    while stack:
        for group in installed[stack.pop()]["depends"]:
            choices = [p for alt in group for p in providers.get(alt, [])]
            if not choices or any(p not in candidates or p in needed for p in choices):
                continue  # satisfied by something that stays (or not satisfiable at all)
            pick = choices[0]
            needed.add(pick)
            if pick not in seen:
                seen.add(pick)
                stack.append(pick)
    return sorted(candidates - needed)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("root", type=Path)
    ap.add_argument("--force", nargs="*", default=[])
    ap.add_argument("--unneeded", nargs="*", default=[])
    ap.add_argument("--keep", nargs="*", default=[])
    args = ap.parse_args(argv)
    status = args.root / "var/lib/dpkg/status"

    def purge(names, force):
        if names:
            print(f"trim: purging {' '.join(names)}", flush=True)
            subprocess.run(["chroot", str(args.root), "dpkg", "--purge", *(["--force-depends"] if force else []),
                            *names], check=True)

    installed = parse_status(status.read_text())
    purge([p for p in args.force if p in installed and p not in args.keep], force=True)
    # Without --force-depends: dpkg itself double-checks that nothing left depends on them.
    purge(unneeded(parse_status(status.read_text()), args.unneeded, args.keep), force=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
