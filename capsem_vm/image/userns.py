"""Can this user build a rootfs without root? mmdebstrap's unshare mode needs unprivileged user
namespaces, newuidmap/newgidmap (package uidmap) and subordinate id ranges for the user's *name* in
/etc/subuid and /etc/subgid (mmdebstrap looks the name up, never the uid). Each missing piece is
named, with what root has to do about it, before a build starts minutes of work."""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from capsem_vm.errors import ImageError

# mmdebstrap maps 65536 ids (0..65535 of the chroot): a smaller range cannot hold a Debian root.
MIN_SUBIDS = 65536


@dataclass(frozen=True)
class Host:
    """The facts the check reads; tests pass their own."""
    user: str
    etc: Path = Path("/etc")
    proc_sys: Path = Path("/proc/sys")

    @classmethod
    def current(cls) -> Host:
        return cls(pwd.getpwuid(os.geteuid()).pw_name)


def subid_count(text: str, user: str) -> int:
    """The size of the user's range in a subuid/subgid file (0 when none; the first entry wins,
    as in mmdebstrap). Malformed lines are skipped."""
    for line in text.splitlines():
        parts = line.strip().split(":")
        if len(parts) == 3 and parts[0] == user:
            try:
                return int(parts[2]) if int(parts[1]) >= 0 else 0
            except ValueError:
                return 0
    return 0


def free_range_start(text: str) -> int:
    """A start for a new 65536-id range past every range the file hands out (100000 at least)."""
    end = 100000
    for line in text.splitlines():
        parts = line.strip().split(":")
        if len(parts) == 3 and parts[1].isdigit() and parts[2].isdigit():
            end = max(end, int(parts[1]) + int(parts[2]))
    return end


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except (OSError, UnicodeDecodeError):
        return None


def missing(host: Host, which=shutil.which) -> list[str]:
    """What keeps `host.user` from an unshare-mode build, one sentence each (empty: nothing known)."""
    problems = []
    tools = [t for t in ("newuidmap", "newgidmap") if not which(t)]
    if tools:
        problems.append(f"{' and '.join(tools)} not installed (root: `apt-get install uidmap`)")
    for name, cmd in (("subuid", "--add-subuids"), ("subgid", "--add-subgids")):
        text = _read(host.etc / name)
        count = subid_count(text, host.user) if text is not None else 0
        if count < MIN_SUBIDS:
            have = "no entry" if count == 0 else f"only {count} ids"
            start = free_range_start(text or "")
            problems.append(f"{host.etc / name} has {have} for user {host.user!r}, {MIN_SUBIDS} needed "
                            f"(root: `usermod {cmd} {start}-{start + MIN_SUBIDS - 1} {host.user}`)")
    if (_read(host.proc_sys / "kernel" / "unprivileged_userns_clone") or "").strip() == "0":
        problems.append("unprivileged user namespaces are disabled "
                        "(root: `sysctl kernel.unprivileged_userns_clone=1`)")
    if (_read(host.proc_sys / "user" / "max_user_namespaces") or "").strip() == "0":
        problems.append("user namespaces are disabled (root: `sysctl user.max_user_namespaces=15000`)")
    if (_read(host.proc_sys / "kernel" / "apparmor_restrict_unprivileged_userns") or "").strip() == "1":
        problems.append("AppArmor restricts unprivileged user namespaces "
                        "(root: `sysctl kernel.apparmor_restrict_unprivileged_userns=0`, or an AppArmor "
                        "profile allowing `userns` for mmdebstrap and unshare)")
    return problems


def probe() -> str | None:
    """Try what the build does (a user namespace with the subordinate ids mapped); None if it works,
    else what unshare said."""
    try:
        out = subprocess.run(["unshare", "--user", "--map-auto", "--map-root-user", "true"],
                             capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return str(exc)
    return None if out.returncode == 0 else (out.stderr.strip()[-500:] or f"exit code {out.returncode}")


def check_unprivileged_build(host: Host | None = None) -> None:
    """Raise ImageError naming every missing piece when this user cannot build without root."""
    host = host or Host.current()
    problems = missing(host)
    if not problems:
        failed = probe()
        if failed:
            problems.append(f"`unshare --user --map-auto --map-root-user` fails: {failed}")
    if problems:
        raise ImageError("building the rootfs as a normal user needs unprivileged user namespaces: "
                         + "; ".join(problems),
                         "ask root to fix the above, or to build the image for everyone "
                         "(`sudo capsem image build`; `capsem setup` as root builds the default one)")
