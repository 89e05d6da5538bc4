"""What goes into an image (the recipe) and the cache keys derived from it."""

from __future__ import annotations

import hashlib
import json
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from capsem_vm.errors import ImageError

# Bump when the build steps change in a way that changes the produced assets (3: the kernel asset
# is the uncompressed ELF kernel, see linux.py).
BUILDER_VERSION = 3
# Bump when the rootfs build steps change in a way that changes the rootfs (part of its cache key,
# separate from BUILDER_VERSION so that a change elsewhere does not rebuild the rootfs).
ROOTFS_VERSION = 2

SUITE = "bookworm"
KERNEL_META_PACKAGE = "linux-image-cloud-amd64"

# The guest's base package set (python3-cffi-backend explicitly: python3-zmq needs the virtual
# python3-cffi-backend-api-* that simple resolvers miss). kmod: `modprobe` for nftables modules.
BASE_PACKAGES = (
    "python3", "python3-ipykernel", "python3-zmq", "python3-cffi-backend", "ca-certificates",
    "python3-numpy", "python3-pandas", "python3-matplotlib", "python3-requests", "python3-pip",
    "curl", "git", "nftables", "python3-httpx", "python3-h2", "python3-websockets", "iproute2",
    "procps", "kmod",
)

# Debian package names (policy 5.6.1) and a conservative pip requirement syntax: anything that
# would reach a shell or apt as an option is rejected early.
_APT_NAME = re.compile(r"^[a-z0-9][a-z0-9+.-]+(=[A-Za-z0-9.+~:-]+)?$")
_PIP_REQ = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._\-\[\],<>=!~ ;:'\"]*$")


@dataclass(frozen=True)
class Recipe:
    """Extra packages baked into the rootfs on top of BASE_PACKAGES."""

    apt: tuple[str, ...] = ()
    pip: tuple[str, ...] = ()
    suite: str = SUITE
    source: str | None = field(default=None, compare=False)  # recipe file, for messages only

    def __post_init__(self):
        for name in self.apt:
            if not _APT_NAME.match(name):
                raise ImageError(f"invalid Debian package name {name!r}",
                                 "use plain package names such as `python3-scipy`")
        object.__setattr__(self, "pip", tuple(r.strip() for r in self.pip))
        for req in self.pip:
            if not _PIP_REQ.match(req) or req.startswith("-"):
                raise ImageError(f"invalid pip requirement {req!r}",
                                 "use requirement specifiers such as `rich==13.7.1`")
        # Normalise so that order and duplicates don't change the cache key.
        object.__setattr__(self, "apt", tuple(sorted(set(self.apt))))
        object.__setattr__(self, "pip", tuple(sorted(set(self.pip))))

    @property
    def is_default(self) -> bool:
        return not self.apt and not self.pip and self.suite == SUITE

    @property
    def packages(self) -> tuple[str, ...]:
        return tuple(sorted(set(BASE_PACKAGES) | set(self.apt)))

    def to_json(self) -> dict:
        return {"suite": self.suite, "apt": list(self.apt), "pip": list(self.pip)}

    def rootfs_key(self) -> str:
        """Mirror-independent: the same packages from another mirror are the same rootfs."""
        return digest_of({"builder": ROOTFS_VERSION, "suite": self.suite,
                          "packages": list(self.packages), "pip": list(self.pip)})


def load_recipe(path: Path) -> Recipe:
    """A TOML recipe: `apt = ["pkg", ...]` and `pip = ["req", ...]`, both optional."""
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise ImageError(f"cannot read recipe {path}: {e}", "a recipe is TOML with `apt` and `pip` lists")
    unknown = set(data) - {"apt", "pip"}
    if unknown:
        raise ImageError(f"recipe {path}: unknown keys {sorted(unknown)}", "only `apt` and `pip` are allowed")
    lists = {}
    for key in ("apt", "pip"):
        value = data.get(key, [])
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ImageError(f"recipe {path}: `{key}` must be a list of strings")
        lists[key] = tuple(value)
    return Recipe(apt=lists["apt"], pip=lists["pip"], source=str(path))


def make_recipe(apt=(), pip=(), recipe_file: Path | None = None) -> Recipe:
    """Combine a recipe file with --apt/--pip options."""
    base = load_recipe(recipe_file) if recipe_file else Recipe()
    return Recipe(apt=base.apt + tuple(apt), pip=base.pip + tuple(pip), source=base.source)


def digest_of(obj) -> str:
    """A stable sha256 of a JSON-able value (sorted keys): the cache key building block."""
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()
