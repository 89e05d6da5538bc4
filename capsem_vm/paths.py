"""Where capsem keeps things: cache (images), data (keys, audit), runtime (per-VM sockets)."""

import os
from pathlib import Path

import platformdirs

APP = "capsem"


SYSTEM_CACHE_DIR = Path("/var/cache") / APP


def cache_dir() -> Path:
    """Built images live here, keyed by recipe hash. Override with CAPSEM_CACHE_DIR.

    root builds into the system cache, where every user's capsem finds the image too.
    """
    override = os.environ.get("CAPSEM_CACHE_DIR")
    if override:
        return Path(override)
    if os.geteuid() == 0:
        return system_cache_dir()
    return Path(platformdirs.user_cache_dir(APP))


def system_cache_dir() -> Path:
    """Images an administrator built for everyone (read-only for other users)."""
    return Path(os.environ.get("CAPSEM_SYSTEM_CACHE_DIR") or SYSTEM_CACHE_DIR)


def data_dir() -> Path:
    """Long-lived private state (CA, signing keys, audit DB). Override with CAPSEM_DATA_DIR."""
    return Path(os.environ.get("CAPSEM_DATA_DIR") or platformdirs.user_data_dir(APP))


def config_dir() -> Path:
    """User configuration (policies). Override with CAPSEM_CONFIG_DIR."""
    return Path(os.environ.get("CAPSEM_CONFIG_DIR") or platformdirs.user_config_dir(APP))


def runtime_dir() -> Path:
    """Per-user runtime root (mode 0700) holding one directory per running VM.

    Kept short: Unix socket paths are limited to 107 bytes.
    """
    override = os.environ.get("CAPSEM_RUNTIME_DIR")
    if override:
        root = Path(override)
    elif os.environ.get("XDG_RUNTIME_DIR"):
        root = Path(os.environ["XDG_RUNTIME_DIR"]) / APP
    elif os.geteuid() == 0:
        root = Path("/run") / APP
    else:
        root = Path(f"/tmp/{APP}-{os.geteuid()}")
    root.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = root.stat()
    if st.st_uid != os.geteuid():
        raise PermissionError(f"runtime dir {root} is owned by uid {st.st_uid}, not by you")
    os.chmod(root, 0o700)
    return root


def ensure_private_dir(path: Path) -> Path:
    """Create `path` (and parents) and make it mode 0700."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(path, 0o700)
    return path
