"""Facts of this checkout and host for tests (no tests here): the repository root, the capsem CLI as
a command, the live capsem helper processes (QEMU, virtiofsd, vhost-device-vsock), and the wheel as
a pip user installs it with a way to run it as an unprivileged user who cannot read the checkout."""

from __future__ import annotations

import atexit
import contextlib
import functools
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CAPSEM = [sys.executable, "-m", "capsem_vm.cli"]
HELPER_NAMES = ("qemu-system-x86_64", "virtiofsd", "vhost-device-vsock")


def helper_processes(*markers: str) -> list[str]:
    """Live capsem helper processes (QEMU, virtiofsd, vhost-device-vsock) as "pid cmdline".

    With markers, only those whose command line mentions one of them (a runtime dir, a share path):
    other engineers' or tests' VMs on the same machine must not count.
    """
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            args = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if state == "Z" or not args:
            continue
        if not any(name in args.split(" ", 1)[0] for name in HELPER_NAMES):
            continue
        if "qemu-system" in args and "capsem" not in args:
            continue
        if markers and not any(m in args for m in markers):
            continue
        found.append(f"{entry.name} {args}")
    return sorted(found)


# --- the wheel as a pip user installs it, shared by every module that tests it (one build per run) ---

SYSTEM_PYTHON = "/usr/bin/python3.11"


def clean_env(home: Path, **extra: str) -> dict[str, str]:
    """A user's environment: no PYTHONPATH (the shared dev env points it at a checkout)."""
    return {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": str(home), "LANG": "C.UTF-8",
            "CAPSEM_DATA_DIR": str(home / "data"), "CAPSEM_CONFIG_DIR": str(home / "config"),
            "CAPSEM_RUNTIME_DIR": str(home / "run"), **extra}


@functools.cache
def installed_wheel() -> dict:
    """The wheel built from this checkout, installed with the system Python into a fresh venv in a
    temporary folder outside the checkout (mode 0755: an unprivileged user runs it too); removed
    when the test run ends. Skips where the system Python or the package index is unavailable."""
    import pytest
    if not os.access(SYSTEM_PYTHON, os.X_OK):
        pytest.skip(f"{SYSTEM_PYTHON} not installed")
    root = Path(tempfile.mkdtemp(prefix="capsem-wheel-"))  # not under pytest's 0700 basetemp
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    os.chmod(root, 0o755)
    assert not root.resolve().is_relative_to(REPO)
    dist = root / "dist"
    # the hook rebuilds the labextension with npm only when its sources are newer than the
    # output (the checkout's prebuilt one is reused otherwise)
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", str(REPO), "--no-deps", "-q", "-w", str(dist)],
                           capture_output=True, text=True, timeout=600, cwd=root)
    assert build.returncode == 0, build.stderr[-3000:]
    wheel, = dist.glob("capsem_jupyter-*.whl")
    venv = root / "venv"
    subprocess.run([SYSTEM_PYTHON, "-m", "venv", str(venv)], check=True, timeout=120)
    home = root / "home"
    (home / "run").mkdir(parents=True, mode=0o700)
    pip = subprocess.run([str(venv / "bin" / "pip"), "install", "-q", str(wheel)],
                         capture_output=True, text=True, timeout=600, cwd=root, env=clean_env(home))
    if pip.returncode != 0 and "No matching distribution" in pip.stderr + pip.stdout:
        pytest.skip("the package index is not reachable: " + pip.stderr[-500:])
    assert pip.returncode == 0, pip.stderr[-3000:]
    elsewhere = root / "elsewhere"
    elsewhere.mkdir()
    return {"root": root, "venv": venv, "home": home, "cwd": elsewhere, "wheel": wheel}


@functools.cache
def user_proxy_python() -> Path:
    """A proxy env as a pip user makes it (`pip install capsem-jupyter[proxy]`'s pins, system
    Python), beside the installed wheel, readable by every user; its interpreter."""
    from capsem_vm.proxy.service import PROXY_REQUIREMENTS
    proxy = installed_wheel()["root"] / "proxy-venv"
    subprocess.run([SYSTEM_PYTHON, "-m", "venv", str(proxy)], check=True, timeout=120)
    pip = subprocess.run([str(proxy / "bin" / "pip"), "install", "-q", *PROXY_REQUIREMENTS],
                         capture_output=True, text=True, timeout=600)
    assert pip.returncode == 0, pip.stderr[-3000:]
    return proxy / "bin" / "python"


def make_readable(path: Path) -> None:
    subprocess.run(["chmod", "-R", "a+rX", str(path)], check=True)


def run_as_user(user: str, script: str, env: dict[str, str], *, hide: tuple[Path, ...] = (REPO,),
                binds: tuple[tuple[Path, str], ...] = (), timeout: float = 600) -> subprocess.CompletedProcess:
    """Run `script` with sh as `user` (runuser: no supplementary groups, `env` only) in a mount
    namespace of its own where each of `hide` is an empty 0700 tmpfs (the checkout unreadable)
    and each (file, target) of `binds` is mounted over target. Needs root."""
    return subprocess.run(as_user_argv(user, script, env, hide=hide, binds=binds), capture_output=True, text=True,
                          timeout=timeout, cwd="/")


def as_user_argv(user: str, script: str, env: dict[str, str], *, hide: tuple[Path, ...] = (REPO,),
                 binds: tuple[tuple[Path, str], ...] = ()) -> list[str]:
    """The command run_as_user runs (for a caller that drives it itself, e.g. through a pty)."""
    mounts = [f"mount -t tmpfs -o mode=0700 none {shlex.quote(str(p))}" for p in hide]
    mounts += [f"mount --bind {shlex.quote(str(src))} {shlex.quote(dst)}" for src, dst in binds]
    inner = " && ".join(mounts + [f"exec runuser -u {shlex.quote(user)} -- env -i "
                                  + " ".join(shlex.quote(f"{k}={v}") for k, v in env.items())
                                  + " sh -c " + shlex.quote(script)])
    return ["unshare", "--mount", "--", "sh", "-c", inner]


def owned_by_others(root: Path, uid: int) -> list[str]:
    """Paths below root (itself included, symlinks not followed) whose owner is not `uid`."""
    found = []
    for d, dirs, files in os.walk(root):
        for name in [".", *dirs, *files]:
            p = Path(d) / name
            try:
                if p.lstat().st_uid != uid:
                    found.append(f"{p} (uid {p.lstat().st_uid})")
            except FileNotFoundError:
                pass
    return sorted(set(found))


@contextlib.contextmanager
def server_on_this_machine(www: Path):
    """A real HTTP server for `www` on this machine's own non-loopback address (a stand-in for the
    internet that never leaves the machine); yields (address, port)."""
    import http.server
    import threading
    addr = subprocess.run(["hostname", "-I"], capture_output=True, text=True, check=True).stdout.split()[0]
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):  # noqa: D102 - not onto the test's stderr
            pass
    handler = functools.partial(Quiet, directory=str(www))
    server = http.server.ThreadingHTTPServer((addr, 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield addr, server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()
