"""Carry out the `do` steps of a setup plan: apt-get, vhost-device-vsock, the proxy env, the image."""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from ..errors import CapsemError
from .plan import Step

APT_ENV = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
DEBIAN_MIRROR = "http://deb.debian.org/debian"
KEYRING = "/usr/share/keyrings/debian-archive-keyring.gpg"


class SetupError(CapsemError):
    """A setup step failed."""


def _run(argv: list[str], *, cwd: str | None = None, timeout: float = 1800) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, env=APT_ENV, cwd=cwd, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise SetupError(f"{argv[0]} failed: {exc}") from None
    if out.returncode != 0:
        tail = "\n".join((out.stderr or out.stdout).strip().splitlines()[-15:])
        raise SetupError(f"`{' '.join(argv)}` exited with {out.returncode}:\n{tail}")
    return out.stdout


def install_packages(step: Step) -> None:
    _run(["apt-get", "update", "-qq"])
    _run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *step.data["packages"]])


def _sid_mirror() -> str:
    """The host's Debian mirror (from its apt sources), else deb.debian.org."""
    text = ""
    for f in ["/etc/apt/sources.list", *sorted(glob.glob("/etc/apt/sources.list.d/*"))]:
        try:
            text += Path(f).read_text(errors="replace") + "\n"
        except OSError:
            pass
    for line in text.splitlines():
        if line.lstrip().startswith("#"):
            continue
        for word in line.replace("URIs:", " ").split():
            if word.startswith(("http://", "https://")) and word.rstrip("/").endswith("/debian"):
                return word.rstrip("/")
    return DEBIAN_MIRROR


def install_vsock(step: Step) -> None:
    """The release's vhost-device-vsock package when its archive has one, else Debian unstable's
    .deb (it needs only libc6 >= 2.34), fetched with a private apt state (the system's sources
    stay untouched) and unpacked to /opt/capsem/bin."""
    shown = subprocess.run(["apt-cache", "show", "vhost-device-vsock"], capture_output=True, text=True)
    if shown.returncode == 0 and shown.stdout.strip():
        _run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", "vhost-device-vsock"])
        return
    with tempfile.TemporaryDirectory() as work:
        for d in ("lists/partial", "cache/archives/partial"):
            os.makedirs(f"{work}/{d}")
        Path(f"{work}/sources.list").write_text(f"deb [signed-by={KEYRING}] {_sid_mirror()} sid main\n")
        opts = ["-o", f"Dir::Etc::sourcelist={work}/sources.list", "-o", "Dir::Etc::sourceparts=/dev/null",
                "-o", f"Dir::State::Lists={work}/lists", "-o", f"Dir::Cache={work}/cache", "-o", "Debug::NoLocking=1"]
        _run(["apt-get", *opts, "update", "-qq"])
        _run(["apt-get", *opts, "download", "vhost-device-vsock"], cwd=work)
        debs = glob.glob(f"{work}/vhost-device-vsock_*.deb")
        if len(debs) != 1:
            raise SetupError(f"apt-get download gave {debs}, not one vhost-device-vsock .deb")
        _run(["dpkg", "-x", debs[0], f"{work}/root"])
        dest = Path(step.data["dest"])
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.new")
        # a fresh file (O_EXCL: never through a link someone left there), mode set on the fd
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o700)
        with os.fdopen(fd, "wb") as out, open(f"{work}/root/usr/bin/vhost-device-vsock", "rb") as src:
            shutil.copyfileobj(src, out)
            os.fchmod(out.fileno(), 0o755)
        os.replace(tmp, dest)
    _run([str(dest), "--version"], timeout=30)


def make_proxy_env(step: Step) -> None:
    path, python = step.data["path"], step.data["python"]
    _run([python, "-m", "venv", "--clear", path], timeout=300)
    _run([f"{path}/bin/pip", "install", "-q", "--disable-pip-version-check", *step.data["requirements"]])
    if os.geteuid() == 0:
        _run(["chmod", "-R", "a+rX", path])  # the system env serves every user


def build_default_image(step: Step) -> None:
    from capsem_vm.image.build import build_image
    from capsem_vm.image.recipe import make_recipe
    build_image(make_recipe())


def retire_images(step: Step) -> None:
    from capsem_vm.image.store import images_dir
    root = images_dir().resolve()
    for d in map(Path, step.data["dirs"]):
        # only a real directory directly in the image store: never follow a link out of it
        if d.is_symlink() or d.parent.resolve() != root:
            raise SetupError(f"{d} is not an image directory in {root}: not removed")
        shutil.rmtree(d)


RUNNERS = {"packages": install_packages, "vsock": install_vsock, "proxy-env": make_proxy_env,
           "image": build_default_image, "retire-images": retire_images}


def run_step(step: Step) -> None:
    RUNNERS[step.key](step)
