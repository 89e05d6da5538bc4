"""The guest agent's files as the initramfs packs them, found through the import system.

The agent tree is `init` (the guest's /init), `capsem-agent` (the launcher /init execs) and the
`capsem_agent` package, each named by its path relative to the tree (the key of the image cache
and the path under /capsem/ in the guest). Where they come from:

- the `capsem_agent` package: wherever Python imports it from (importlib.resources), the same
  package the host imports `capsem_agent.protocol` from;
- `init` and `capsem-agent`: package data of capsem_vm (capsem_vm/image/agent_boot/, put there by
  the wheel build) in an installed wheel; beside the package (guest-agent/) in a source checkout.
- CAPSEM_GUEST_AGENT_DIR overrides all of it with one directory laid out like guest-agent/.

A checkout and a wheel built from it yield the same (path, bytes, mode) list, so they share the
cached images. Modes are reduced to executable or not (0o755/0o644): what git and a wheel keep.
"""

from __future__ import annotations

import importlib.resources
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

from capsem_vm.errors import ImageError

PACKAGE = "capsem_agent"
BOOT_FILES = ("init", "capsem-agent")
BOOT_DATA = ("capsem_vm.image", "agent_boot")  # (package, directory) of the boot files in a wheel
OVERRIDE_ENV = "CAPSEM_GUEST_AGENT_DIR"


@dataclass(frozen=True)
class AgentFile:
    rel: str      # posix path relative to the agent tree ("init", "capsem_agent/protocol.py")
    path: Path    # where it is on this host

    @property
    def executable(self) -> bool:
        return bool(os.stat(self.path).st_mode & 0o111)

    @property
    def mode(self) -> int:
        return 0o755 if self.executable else 0o644


@dataclass(frozen=True)
class AgentTree:
    package_dir: Path          # the capsem_agent package directory
    boot_dir: Path             # holds init and capsem-agent

    @property
    def import_root(self) -> Path:
        """A directory that has `capsem_agent` in it (to import the agent with sys.path[0] = it)."""
        return self.package_dir.parent

    def file(self, rel: str) -> AgentFile:
        if rel in BOOT_FILES:
            return AgentFile(rel, self.boot_dir / rel)
        return AgentFile(rel, self.import_root / rel)

    def files(self) -> list[AgentFile]:
        """init first, then what goes to /capsem/, in a fixed order (sorted per directory)."""
        out = [AgentFile(rel, self.boot_dir / rel) for rel in BOOT_FILES]
        for root, dirs, names in os.walk(self.package_dir):
            dirs[:] = sorted(d for d in dirs if d != "__pycache__" and not d.startswith("."))
            for n in sorted(names):
                if n.endswith(".pyc") or n.startswith("."):
                    continue
                p = Path(root) / n
                out.append(AgentFile(p.relative_to(self.import_root).as_posix(), p))
        return out


def _is_boot_dir(path: Path) -> bool:
    return all((path / name).is_file() for name in BOOT_FILES)


def find_agent_tree() -> AgentTree:
    override = os.environ.get(OVERRIDE_ENV)
    if override:
        root = Path(override)
        if not (_is_boot_dir(root) and (root / PACKAGE).is_dir()):
            raise ImageError(f"{OVERRIDE_ENV}={root} is not a guest agent tree "
                             f"(needs {', '.join(BOOT_FILES)} and {PACKAGE}/)",
                             f"point it at a directory laid out like guest-agent/, or unset it")
        return AgentTree(root / PACKAGE, root)
    if importlib.util.find_spec(PACKAGE) is None:
        raise ImageError(f"the guest agent package {PACKAGE} is not importable",
                         "reinstall capsem-jupyter (the wheel ships it)")
    package_dir = _real_dir(importlib.resources.files(PACKAGE))
    try:
        shipped = _real_dir(importlib.resources.files(BOOT_DATA[0]) / BOOT_DATA[1])
    except ImageError:
        shipped = None
    for boot_dir in (shipped, package_dir.parent):
        if boot_dir is not None and _is_boot_dir(boot_dir):
            return AgentTree(package_dir, boot_dir)
    raise ImageError(f"the guest agent's {' and '.join(BOOT_FILES)} were not found (looked in "
                     f"{BOOT_DATA[0]}'s {BOOT_DATA[1]}/ and beside {package_dir})",
                     "reinstall capsem-jupyter: its wheel ships them; a source checkout has them "
                     "in guest-agent/")


def _real_dir(resource) -> Path:
    """The installed files must be plain files on disk (not in a zip): they are read and hashed."""
    path = Path(os.fspath(resource)) if isinstance(resource, os.PathLike) else None
    if path is None or not path.is_dir():
        raise ImageError(f"{resource} is not a directory on disk",
                         "install capsem-jupyter as a regular (unzipped) package")
    return path
