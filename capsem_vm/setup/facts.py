"""Read the facts plan.py plans from: os-release, dpkg's installed packages, the proxy envs, images.

Only reads. The packages part needs nothing outside the standard library (it runs before any venv
exists, from `make system`); the proxy env and image parts import capsem's modules when asked.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from .locations import system_proxy_env
from .plan import (VSOCK_BIN, Facts, ImageFacts, Options, ProxyEnvFacts, pinned_versions, requirement_name,
                   requirements_for)
from .hostos import MIN_PYTHON, parse_os_release

SYSTEM_PYTHON = "/usr/bin/python3"
_DIST_INFO = re.compile(r"^(?P<name>[A-Za-z0-9._-]+?)-(?P<version>[^-]+)\.dist-info$")


def os_release(path: str | None = None) -> dict[str, str]:
    for p in ([path] if path else ["/etc/os-release", "/usr/lib/os-release"]):
        try:
            return parse_os_release(Path(p).read_text(errors="replace"))
        except OSError:
            continue
    return {}


def installed_packages() -> frozenset[str]:
    """Packages dpkg has fully installed (none on a host without dpkg)."""
    try:
        out = subprocess.run(["dpkg-query", "-W", "-f=${Package} ${db:Status-Abbrev}\n"],
                             capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return frozenset()
    names = set()
    for line in out.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[1].startswith("ii"):
            names.add(parts[0].split(":")[0])
    return frozenset(names)


def find_vsock() -> str | None:
    for cand in (os.environ.get("CAPSEM_VHOST_DEVICE_VSOCK"), shutil.which("vhost-device-vsock"), VSOCK_BIN):
        if cand and os.path.isfile(cand) and os.access(cand, os.X_OK):
            return cand
    return None


def proxy_env(path: str) -> ProxyEnvFacts:
    """What a proxy env at `path` has: read from its dist-info directories, no interpreter started."""
    root = Path(path)
    if not (root / "bin" / "python").exists():
        return ProxyEnvFacts(path)
    dists: dict[str, str] = {}
    for site in root.glob("lib/python3*/site-packages"):
        try:
            entries = os.listdir(site)
        except OSError:
            continue
        for entry in entries:
            m = _DIST_INFO.match(entry)
            if m:
                dists[requirement_name(m["name"])] = m["version"]
    return ProxyEnvFacts(path, True, dists.get("mitmproxy"), frozenset(dists))


def python_version(python: str) -> tuple[int, int]:
    if python == sys.executable:
        return sys.version_info[:2]
    try:
        out = subprocess.run([python, "-c", "import sys; print(*sys.version_info[:2])"],
                             capture_output=True, text=True, timeout=30).stdout.split()
        return int(out[0]), int(out[1])
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return (0, 0)


def proxy_python(is_root: bool) -> tuple[str, tuple[int, int]]:
    """The interpreter a new proxy env is made from: the system's python3 (every user can run it;
    this process's may live in root's home), else for a normal user this one."""
    if os.access(SYSTEM_PYTHON, os.X_OK):
        version = python_version(SYSTEM_PYTHON)
        if version >= MIN_PYTHON or is_root:
            return SYSTEM_PYTHON, version
    return sys.executable, sys.version_info[:2]


def proxy_requirements() -> tuple[str, ...]:
    from capsem_vm.proxy.service import PROXY_REQUIREMENTS  # the pyproject `proxy` extra (a test checks)
    return tuple(PROXY_REQUIREMENTS)


def image_facts() -> ImageFacts:
    """The cache this process builds into: is the default recipe's image there, which are older."""
    from capsem_vm import paths
    from capsem_vm.image.build import cached_image
    from capsem_vm.image.manifest import MANIFEST_NAME, parse_manifest
    from capsem_vm.image.recipe import BUILDER_VERSION, make_recipe
    from capsem_vm.image.store import images_dir
    old = []
    root = images_dir()
    if root.is_dir():
        for d in sorted(root.iterdir()):
            if d.name.startswith(".") or d.is_symlink() or not d.is_dir():
                continue
            try:
                manifest = parse_manifest((d / MANIFEST_NAME).read_bytes(), d)
            except Exception:  # noqa: BLE001 - unreadable/incomplete: not ours to judge here
                continue
            version = manifest.get("builder_version", 0)
            if isinstance(version, int) and version < BUILDER_VERSION:
                old.append(str(d))
    return ImageFacts(str(paths.cache_dir()), cached_image(make_recipe()) is not None, tuple(old))


def system_image_present() -> bool:
    from capsem_vm import paths
    link = paths.system_cache_dir() / "images" / "default"
    return (link / "manifest.json").is_file()


def gather(options: Options, os_release_file: str | None = None) -> Facts:
    is_root = os.geteuid() == 0
    facts: dict = {"os_release": os_release(os_release_file), "is_root": is_root}
    if options.packages:
        facts.update(installed=installed_packages(),
                     commands=frozenset(c for c in ("npm",) if shutil.which(c)), vsock=find_vsock())
    if options.proxy_env:
        requirements = proxy_requirements()
        python, version = proxy_python(is_root)
        if options.proxy_env_path:
            user = proxy_env(str(Path(options.proxy_env_path).absolute()))
        else:
            from capsem_vm import paths
            user = proxy_env(str(paths.data_dir() / "proxy-venv"))
        facts.update(system_proxy=proxy_env(system_proxy_env()), user_proxy=user, proxy_python=python,
                     proxy_python_version=version, requirements=requirements,
                     # the pin whose marker holds for the Python the env is made from
                     known_mitmproxy=pinned_versions(requirements_for(requirements, version), "mitmproxy"))
    want_image = is_root if options.image is None else options.image
    if options.image is not False:
        if want_image:
            facts["image"] = image_facts()
        else:
            facts["system_image"] = system_image_present()
    return Facts(**facts)
