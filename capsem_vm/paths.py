"""Where capsem keeps things: cache (images), data (keys, audit), runtime (per-VM sockets)."""

import os
import stat
from pathlib import Path

import platformdirs

from . import nofollow

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
    """Per-user runtime root (mode 0700, checked: ours, not a symlink, not opened up, in a parent
    nobody else can swap it in) holding one directory per running VM.

    CAPSEM_RUNTIME_DIR, else $XDG_RUNTIME_DIR/capsem when that dir is ours and private, else
    /run/capsem for root, /run/user/UID/capsem when that dir is ours and private, else the user's
    own data dir. Never a fixed name in /tmp, which anybody could create first. Kept short: Unix
    socket paths are limited to 107 bytes.
    """
    override = os.environ.get("CAPSEM_RUNTIME_DIR")
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if override:
        root = Path(override)
    elif xdg and _own_private_dir(Path(xdg)):
        root = Path(xdg) / APP
    elif os.geteuid() == 0:
        root = Path("/run") / APP
    elif _own_private_dir(Path(f"/run/user/{os.geteuid()}")):
        root = Path(f"/run/user/{os.geteuid()}") / APP
    else:
        root = data_dir() / "run"
    return nofollow.private_dir(root)


def _own_private_dir(path: Path) -> bool:
    try:
        st = path.lstat()
    except OSError:
        return False
    return stat.S_ISDIR(st.st_mode) and st.st_uid == os.geteuid() and not st.st_mode & 0o077


def ensure_private_dir(path: Path) -> Path:
    """Create `path` (and parents) and make it mode 0700; refuse one that is a symlink, someone
    else's or writable by others (nofollow.private_dir)."""
    return nofollow.private_dir(path)
