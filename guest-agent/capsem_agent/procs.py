"""Process helpers shared by exec and kernel: spawn credentials, environment, async wait."""

from __future__ import annotations

import asyncio
import os
import pwd
import subprocess

from . import fdwait

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# Filled by egress_setup (egress.py): proxy and CA variables every later exec and kernel gets.
EGRESS_ENV: dict[str, str] = {}


def credentials(uid: int | None, gid: int | None) -> dict:
    """Popen kwargs that drop to uid/gid (and clear supplementary groups) when asked."""
    if uid is None and gid is None:
        return {}
    kw = {"extra_groups": []}
    if gid is None and uid is not None:
        try:
            gid = pwd.getpwuid(uid).pw_gid
        except KeyError:
            gid = uid
    if gid is not None:
        kw["group"] = gid
    if uid is not None:
        kw["user"] = uid
    return kw


def home_for(uid: int | None) -> str:
    uid = os.getuid() if uid is None else uid
    try:
        return pwd.getpwuid(uid).pw_dir
    except KeyError:
        return "/" if uid != 0 else "/root"


def base_env(uid: int | None, term: str) -> dict[str, str]:
    """A clean environment: the agent's own variables (CAPSEM_AGENT_*, ...) never leak to guests."""
    env = {
        "PATH": os.environ.get("PATH") or DEFAULT_PATH,
        "HOME": home_for(uid),
        "LANG": "C.UTF-8",
        "TERM": term,
    }
    env.update(EGRESS_ENV)
    return env


async def wait_exit(proc: subprocess.Popen) -> int:
    """Wait for a child without a thread: a pidfd becomes readable when the process exits."""
    loop = asyncio.get_running_loop()
    try:
        fd = os.pidfd_open(proc.pid)
    except (AttributeError, OSError):
        return await loop.run_in_executor(None, proc.wait)
    try:
        await fdwait.readable(fd)
    finally:
        os.close(fd)
    return proc.wait()


def exit_fields(returncode: int) -> dict:
    """Popen's returncode as the protocol's {code, signal}."""
    if returncode < 0:
        return {"code": None, "signal": -returncode}
    return {"code": returncode, "signal": None}


def signal_group(pid: int, signum: int) -> None:
    """Signal the process group (the process is a session leader), or the process if that fails."""
    try:
        os.killpg(pid, signum)
    except ProcessLookupError:
        os.kill(pid, signum)
