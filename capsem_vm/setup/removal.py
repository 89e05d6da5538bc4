"""What `capsem uninstall` removes: plan (sans-IO, from the locations) and removal.

Two kinds of things, asked for separately:
  state  kernelspecs, images and build cache, runtime state, the proxy env(s), the vsock helper:
         all rebuildable; removed by `capsem uninstall`
  data   the CA, image signing keys, audit database (data dir) and policies (config dir): removed
         only with --data, after a typed confirmation or --yes
Only capsem's own directories are removed, whole; never a path that is /, the home directory or one
of its parents (a CAPSEM_*_DIR pointing at one is refused), never through a symlink.
Host packages stay (other programs may use them).
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

STATE, DATA = "state", "data"


@dataclass(frozen=True)
class Target:
    path: str
    what: str
    kind: str


def unsafe_reason(path: str, home: str) -> str | None:
    """Why `path` must not be removed whole, or None (pure: no file system access)."""
    p = os.path.normpath(path)
    if not os.path.isabs(p):
        return "not an absolute path"
    if p == "/":
        return "it is /"
    h = os.path.normpath(home) if home else ""
    if h and (p == h or h.startswith(p.rstrip("/") + "/")):
        return "it is the home directory or one of its parents"
    return None


def plan_removal(candidates: list[Target], *, exists, home: str, data: bool) -> tuple[list[Target], list[str]]:
    """(what to remove, notes): the candidates that exist, data ones only if asked, nested ones once,
    unsafe ones refused with a note. `exists(path)` is the one question asked of the host."""
    out: list[Target] = []
    notes: list[str] = []
    seen: list[str] = []
    for t in candidates:
        if t.kind == DATA and not data:
            if exists(t.path):
                notes.append(f"kept {t.what}: {t.path} (remove with --data)")
            continue
        why = unsafe_reason(t.path, home)
        if why:
            notes.append(f"refused {t.path} ({t.what}): {why}")
            continue
        p = os.path.normpath(t.path)
        if any(p == s or p.startswith(s.rstrip("/") + "/") for s in seen) or not exists(t.path):
            continue
        seen.append(p)
        out.append(t)
    return out, notes


def _exists(path: str) -> bool:
    return os.path.lexists(path)


def capsem_kernelspecs() -> list[Target]:
    """Installed kernelspecs whose provisioner is capsem's (any name), where this user may remove them."""
    try:
        from jupyter_client.kernelspec import KernelSpecManager
        from capsem_kernel.kernelspec import PROVISIONER_NAME
    except ImportError:
        return []
    out = []
    for name, directory in sorted(KernelSpecManager().find_kernel_specs().items()):
        try:
            import json
            spec = json.loads(Path(directory, "kernel.json").read_text())
            prov = spec.get("metadata", {}).get("kernel_provisioner", {}).get("provisioner_name")
        except (OSError, ValueError, AttributeError):
            continue
        if prov == PROVISIONER_NAME and os.access(os.path.dirname(directory), os.W_OK):
            out.append(Target(directory, f"kernelspec {name!r}", STATE))
    return out


def candidates() -> list[Target]:
    """Everything capsem may have put on this host for this user (and for everyone, as root)."""
    from capsem_vm import paths
    from .locations import system_prefix
    prefix = system_prefix()
    out = capsem_kernelspecs()
    out.append(Target(str(paths.cache_dir()), "images and build cache", STATE))
    if os.geteuid() == 0:
        out.append(Target(str(paths.system_cache_dir()), "system images", STATE))
        out.append(Target(prefix, "system proxy env and vhost-device-vsock", STATE))
    out.append(Target(str(paths.data_dir() / "proxy-venv"), "proxy env", STATE))
    out.append(Target(str(paths.data_dir() / "run"), "runtime state", STATE))
    runtime = _runtime_root()
    if runtime:
        out.append(Target(runtime, "runtime state", STATE))
    out.append(Target(str(paths.data_dir()), "CA, signing keys and audit database", DATA))
    out.append(Target(str(paths.config_dir()), "policies and configuration", DATA))
    return out


def _runtime_root() -> str | None:
    """The runtime dir paths.runtime_dir() would use, without creating it."""
    from capsem_vm import paths
    override = os.environ.get("CAPSEM_RUNTIME_DIR")
    if override:
        return override
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg and paths._own_private_dir(Path(xdg)):
        return str(Path(xdg) / paths.APP)
    if os.geteuid() == 0:
        return f"/run/{paths.APP}"
    user_run = Path(f"/run/user/{os.geteuid()}")
    if paths._own_private_dir(user_run):
        return str(user_run / paths.APP)
    return None  # the data dir's run/ (listed already)


def plan(data: bool) -> tuple[list[Target], list[str]]:
    return plan_removal(candidates(), exists=_exists, home=os.path.expanduser("~"), data=data)


def remove(target: Target) -> None:
    p = Path(target.path)
    if p.is_symlink() or not p.is_dir():
        p.unlink()  # a link is removed, never followed
    else:
        shutil.rmtree(p)
