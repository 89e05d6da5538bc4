"""Debian package sources: the host's mirror, and a private apt (own lists/cache, no root, the
system's apt state untouched) for downloading single .debs such as the kernel."""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from capsem_vm.errors import ImageError, MissingHelperError

DEFAULT_MIRROR = "http://deb.debian.org/debian"
DEFAULT_SECURITY = "http://deb.debian.org/debian-security"
KEYRING = "/usr/share/keyrings/debian-archive-keyring.gpg"


@dataclass(frozen=True)
class Mirrors:
    main: str = DEFAULT_MIRROR
    security: str = DEFAULT_SECURITY

    def apt_lines(self, suite: str) -> list[str]:
        """One-line sources for the suite, its updates and its security updates."""
        return [f"deb {self.main} {suite} main", f"deb {self.main} {suite}-updates main",
                f"deb {self.security} {suite}-security main"]


def _source_entries(etc: Path) -> list[tuple[str, list[str]]]:
    """(uri, suites) from sources.list (one-line) and sources.list.d/*.sources (deb822)."""
    entries = []
    one_line = [etc / "sources.list", *sorted((etc / "sources.list.d").glob("*.list"))]
    for f in one_line:
        try:
            text = f.read_text()
        except OSError:
            continue
        for line in text.splitlines():
            line = re.sub(r"\[[^\]]*\]", " ", line.split("#", 1)[0]).split()
            if len(line) >= 3 and line[0] == "deb":
                entries.append((line[1], [line[2]]))
    for f in sorted((etc / "sources.list.d").glob("*.sources")):
        try:
            stanzas = f.read_text().split("\n\n")
        except OSError:
            continue
        for stanza in stanzas:
            fields = {}
            for line in stanza.splitlines():
                if line.startswith("#") or ":" not in line or line[0].isspace():
                    continue
                key, value = line.split(":", 1)
                fields[key.strip().lower()] = value.split()
            if "deb" in fields.get("types", []) and fields.get("enabled", ["yes"]) != ["no"]:
                for uri in fields.get("uris", []):
                    entries.append((uri, fields.get("suites", [])))
    return entries


def host_mirrors(etc: Path = Path("/etc/apt")) -> Mirrors:
    """The Debian mirror the host's apt uses (so builds work behind the same proxy/mirror)."""
    main = security = None
    for uri, suites in _source_entries(etc):
        uri = uri.rstrip("/")
        if not uri.startswith(("http://", "https://")):
            continue
        if any(s.endswith("-security") for s in suites) or uri.endswith("-security"):
            security = security or uri
        elif uri.endswith("/debian"):
            main = main or uri
    return Mirrors(main or DEFAULT_MIRROR, security or (main + "-security" if main else DEFAULT_SECURITY))


class PrivateApt:
    """apt-get/apt-cache with their own sources, lists and cache under `state`."""

    def __init__(self, state: Path, mirrors: Mirrors, suite: str, run):
        if not shutil.which("apt-get"):
            raise MissingHelperError("apt-get is not installed", "building images needs a Debian-like host with apt")
        if not Path(KEYRING).exists():
            raise MissingHelperError(f"{KEYRING} is missing", "install debian-archive-keyring (`capsem setup` as root)")
        self.state = state
        self.run = run  # progress-aware subprocess runner
        (state / "lists" / "partial").mkdir(parents=True, exist_ok=True)
        (state / "cache" / "archives" / "partial").mkdir(parents=True, exist_ok=True)
        sources = state / "sources.list"
        sources.write_text("".join(
            line.replace("deb ", f"deb [signed-by={KEYRING}] ", 1) + "\n" for line in mirrors.apt_lines(suite)))
        self.opts = [
            "-o", f"Dir::Etc::sourcelist={sources}", "-o", "Dir::Etc::sourceparts=/dev/null",
            "-o", f"Dir::State::Lists={state / 'lists'}", "-o", f"Dir::Cache={state / 'cache'}",
            "-o", "Dir::State::status=/dev/null", "-o", "Debug::NoLocking=1",
        ]
        if _is_root():  # the _apt sandbox user can't write into our private cache
            self.opts += ["-o", "APT::Sandbox::User=root"]

    def update(self) -> None:
        self.run(["apt-get", *self.opts, "-q", "update"])

    def download(self, package: str, dest: Path) -> Path:
        """Download the candidate version of `package` into `dest`; returns the .deb path."""
        before = set(dest.glob("*.deb"))
        self.run(["apt-get", *self.opts, "-q", "download", package], cwd=dest)
        new = sorted(set(dest.glob("*.deb")) - before) or sorted(dest.glob(f"{package}_*.deb"))
        if not new:
            raise ImageError(f"apt-get download {package} produced no .deb", "check network access to the Debian mirror")
        return new[-1]


def deb_field(deb: Path, field: str) -> str:
    return subprocess.run(["dpkg-deb", "-f", str(deb), field], check=True,
                          capture_output=True, text=True).stdout.strip()


def _is_root() -> bool:
    import os
    return os.geteuid() == 0
