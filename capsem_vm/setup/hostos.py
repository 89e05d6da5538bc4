"""Which host release this is (from /etc/os-release) and what capsem needs installed on it.

Sans-IO: parse_os_release() takes the file's text, host_release() maps it to a HostRelease or None
(an OS capsem has no package mapping for: the caller lists what to install by hand).
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass

MIN_PYTHON = (3, 11)

# Debian 12's package names: the host programs capsem drives and what builds its image.
BASE_PACKAGES = (
    "qemu-system-x86", "qemu-utils", "busybox-static", "debootstrap", "mmdebstrap", "erofs-utils",
    "cpio", "zstd", "debian-archive-keyring", "ca-certificates", "socat", "kmod", "uidmap",
    "util-linux", "python3-venv",
)
# only for working on capsem itself (a source checkout: `make system`): the JupyterLab extension's
# build (nodejs, npm) and the browser tests (chromium). npm: NodeSource's nodejs carries it, so it
# counts as present when an `npm` command is there.
DEV_PACKAGES = ("make", "nodejs", "npm", "chromium")

# What each program is for, for the message on an OS without a mapping.
WHAT_FOR = {
    "QEMU (qemu-system-x86_64, qemu-img), 7.2 or later": "runs the VMs",
    "virtiofsd (C one from QEMU <= 7.2, or the Rust one)": "shares the notebook folder",
    "vhost-device-vsock (rust-vmm), when /dev/vhost-vsock is missing": "the host<->guest channel",
    "busybox (static), cpio, zstd, kmod, erofs-utils": "build the VM image",
    "mmdebstrap or debootstrap, and Debian's archive keyring": "build the guest's Debian root",
    "newuidmap/newgidmap (uidmap), unshare/setpriv (util-linux)": "confine the helpers, build as a normal user",
    "Python 3.11 with venv": "the egress proxy's own env (mitmproxy 11.0.2; 12.3.1 on Python 3.12+)",
}


@dataclass(frozen=True)
class HostRelease:
    id: str                      # os-release ID: debian, ubuntu
    version_id: str              # "12", "24.04"
    name: str                    # PRETTY_NAME
    packages: tuple[str, ...]    # what apt installs
    tested: bool                 # the project's suite runs on it (Debian 12)
    note: str = ""               # said in the plan (untested, ...)
    python: tuple[int, int] = (3, 11)  # the release's python3
    refusal: str = ""            # non-empty: capsem cannot be set up on it, and why


def parse_os_release(text: str) -> dict[str, str]:
    """KEY=value lines of os-release(5), values unquoted as a shell would; bad lines skipped."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, _, raw = line.partition("=")
        if not key.replace("_", "").isalnum():
            continue
        try:
            words = shlex.split(raw)
        except ValueError:
            continue
        out[key] = words[0] if words else ""
    return out


def host_release(os_release: dict[str, str]) -> HostRelease | None:
    """The mapping for this host, or None for an OS capsem has none for."""
    ident, version = os_release.get("ID", ""), os_release.get("VERSION_ID", "")
    name = os_release.get("PRETTY_NAME") or f"{ident} {version}".strip()
    if ident == "debian" and version == "12":
        return HostRelease(ident, version, name, BASE_PACKAGES, tested=True, python=(3, 11))
    if ident == "debian" and version == "13":
        # QEMU 10 has no C virtiofsd: the Rust one is its own package
        return HostRelease(ident, version, name, BASE_PACKAGES + ("virtiofsd",), tested=False, python=(3, 13),
                           note="Debian 13: VM, kernel and egress tests run in a trixie root "
                                "(docs/OTHER-RELEASES.md); the whole suite runs on Debian 12")
    if ident == "ubuntu" and version == "24.04":
        # debian-archive-keyring, mmdebstrap, erofs-utils, virtiofsd: universe
        return HostRelease(ident, version, name, BASE_PACKAGES + ("virtiofsd",), tested=False, python=(3, 12),
                           note="Ubuntu 24.04: package names mapped, untested (Ubuntu's archive is not "
                                "reachable from the machines this project is tested on); needs universe")
    if ident == "ubuntu" and version == "22.04":
        return HostRelease(ident, version, name, (), tested=False, python=(3, 10),
                           refusal="Ubuntu 22.04's Python is 3.10, below capsem's minimum 3.11: use "
                                   "Ubuntu 24.04 or Debian 12/13")
    return None


def manual_install_text(os_release: dict[str, str]) -> str:
    """For an OS without a mapping: what to install by hand."""
    name = os_release.get("PRETTY_NAME") or os_release.get("ID") or "this OS"
    lines = [f"capsem setup has no package list for {name}; it knows Debian 12 and 13 (and Ubuntu 24.04, "
             "untested). Install these with your package manager, then run `capsem setup --no-packages`:"]
    lines += [f"  - {what}: {why}" for what, why in WHAT_FOR.items()]
    return "\n".join(lines)
