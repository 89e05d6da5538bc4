"""The capsem code the proxy child imports, and nothing else from this (Jupyter) environment.

The child runs in its own venv (mitmproxy pins tornado/cryptography versions a current Jupyter
server does not accept), but it imports the same capsem code as the parent: `capsem_vm` and
`capsem_agent` (for capsem_agent.protocol). Putting their parent directory on its PYTHONPATH
would, for an installed wheel, put the whole site-packages of the Jupyter env there: the very clash
the separate env exists to avoid. So the child's PYTHONPATH is one private directory holding
exactly two symlinks, to the two packages this process imports.

The directory lives in the per-user runtime dir (0700, checked by paths.runtime_dir), named by the
targets, made once (atomic rename) and reused by every later start with the same code.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

from .. import paths
from ..errors import CapsemError

PACKAGES = ("capsem_vm", "capsem_agent")


def package_dirs() -> dict[str, Path]:
    """name -> directory of each package the child needs, as this process imports it."""
    out = {}
    for name in PACKAGES:
        spec = importlib.util.find_spec(name)
        locations = list(spec.submodule_search_locations or []) if spec else []
        if len(locations) != 1 or not Path(locations[0], "__init__.py").is_file():
            raise CapsemError(f"cannot find the {name} package on disk for the proxy service "
                              f"(found {locations})", "reinstall capsem-jupyter")
        out[name] = Path(locations[0]).resolve()
    return out


def _holds_exactly(directory: Path, targets: dict[str, Path]) -> bool:
    try:
        if directory.is_symlink() or not directory.is_dir():
            return False
        if sorted(os.listdir(directory)) != sorted(targets):
            return False
        return all(os.readlink(directory / name) == str(t) for name, t in targets.items())
    except OSError:
        return False


def child_code_dir(runtime: Path | None = None) -> Path:
    """A directory with only `capsem_vm` and `capsem_agent` in it: the proxy child's PYTHONPATH."""
    targets = package_dirs()
    root = paths.ensure_private_dir(runtime or paths.runtime_dir())
    key = hashlib.sha256("\0".join(f"{n}={t}" for n, t in sorted(targets.items())).encode()).hexdigest()[:16]
    final = root / f"proxy-code-{key}"
    if _holds_exactly(final, targets):
        return final
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=".proxy-code-"))  # mode 0700
    moved = False
    try:
        for name, target in targets.items():
            os.symlink(target, tmp / name)
        try:
            os.rename(tmp, final)  # fails if another start made it first (or something else is there)
            moved = True
        except OSError:
            if not _holds_exactly(final, targets):  # not a concurrent start's: fail closed
                raise CapsemError(f"{final} is in the way of the proxy service's code directory",
                                  f"remove it (capsem makes it again): rm -r {final}") from None
    finally:
        if not moved:
            shutil.rmtree(tmp, ignore_errors=True)
    return final
