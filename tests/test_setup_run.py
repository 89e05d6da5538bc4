"""`capsem setup` and `capsem uninstall` run for real on this machine: as root and as a real
unprivileged account (`capsemtest`, no supplementary groups), in temporary dirs (CAPSEM_*_DIR), so
the machine's own proxy env, images and keys are left alone.

- a second `capsem setup` changes nothing and says so;
- a normal user gets a per-user proxy env (or uses the system one), and the exact root commands for
  what only root can do;
- `capsem setup --image` retires images of an older builder version and keeps the data dir;
- `capsem uninstall` removes exactly capsem's things: kernelspec, images, runtime state, proxy env;
  the CA/keys/audit data and policies only with --data and --yes; notebooks and files outside
  capsem's dirs never.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from capsem_vm.setup.facts import installed_packages, proxy_env
from capsem_vm.setup.hostos import host_release, parse_os_release

REPO = Path(__file__).resolve().parent.parent
OS = REPO / "tests" / "data" / "os-release"
CODE_PATH = f"{REPO}:{REPO / 'guest-agent'}"

root_only = pytest.mark.skipif(os.geteuid() != 0, reason="makes and runs as an unprivileged account (needs root)")


def _tree(path: Path) -> dict[str, int]:
    """Every entry under `path` and its mtime: what a run that changes nothing leaves as it was."""
    return {str(p.relative_to(path)): p.lstat().st_mtime_ns for p in path.rglob("*")}


def capsem(*args, env=None, timeout=900):
    return subprocess.run([sys.executable, "-m", "capsem_vm.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})}, stdin=subprocess.DEVNULL)


@pytest.fixture
def world_dir():
    """A temporary home readable by the unprivileged account (pytest's tmp_path is 0700 root's)."""
    d = Path(tempfile.mkdtemp(prefix="capsem-setup-"))
    os.chmod(d, 0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


class User:
    """Runs capsem as `capsemtest` with its own HOME and capsem dirs under `home`."""

    def __init__(self, home: Path):
        from test_kernel_user import USER, ensure_user, python_for
        self.entry = ensure_user()
        assert os.getgrouplist(USER, self.entry.pw_gid) == [self.entry.pw_gid]
        self.prefix = ["runuser", "-u", USER, "--"]
        self.python, self.site = python_for(self.prefix)
        self.home = home
        home.mkdir(mode=0o700)
        os.chown(home, self.entry.pw_uid, self.entry.pw_gid)
        self.env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": str(home), "LANG": "C.UTF-8",
                    "PYTHONPATH": CODE_PATH, "CAPSEM_DATA_DIR": str(home / "data"),
                    "CAPSEM_CACHE_DIR": str(home / "cache"), "CAPSEM_CONFIG_DIR": str(home / "config"),
                    "CAPSEM_RUNTIME_DIR": str(home / "run"), "JUPYTER_DATA_DIR": str(home / "jupyter")}

    def capsem(self, *args, timeout=900) -> subprocess.CompletedProcess:
        code = ("import site, sys\n"
                f"if {self.site!r}: site.addsitedir({self.site!r})\n"
                "from capsem_vm.cli import main\nsys.exit(main(sys.argv[1:]))")
        return subprocess.run(self.prefix + ["env", "-i", *(f"{k}={v}" for k, v in self.env.items()),
                                             self.python, "-c", code, *args],
                              capture_output=True, text=True, timeout=timeout, cwd="/", stdin=subprocess.DEVNULL)


@root_only
def test_a_normal_user_gets_the_exact_root_commands_for_what_it_cannot_do(world_dir):
    """As `capsemtest`, planning for a Debian 13 host: the packages this machine lacks for it are
    root's to install; the run says exactly which command and exits 3 (the rest needs root)."""
    user = User(world_dir / "home")
    rel = host_release(parse_os_release((OS / "debian-13").read_text()))
    missing = [p for p in rel.packages if p not in installed_packages()]
    assert missing, "this machine has every Debian 13 package: pick another release to plan for"
    out = user.capsem("setup", "--no-proxy-env", "--no-image", "--os-release", str(OS / "debian-13"))
    assert out.returncode == 3, out.stdout + out.stderr
    assert "root must run" in out.stdout
    assert ("apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "
            + " ".join(missing)) in out.stdout, out.stdout


@pytest.mark.slow  # makes a proxy env from nothing (pip from the package index: about a minute)
def test_setup_makes_the_proxy_env_and_a_second_run_changes_nothing(world_dir):
    env_dir = world_dir / "penv"
    started = time.monotonic()
    first = capsem("setup", "--no-image", "--proxy-env", str(env_dir))
    made = time.monotonic() - started
    assert first.returncode == 0, first.stdout + first.stderr
    assert "egress proxy env: done in" in first.stdout and "host packages: already there" in first.stdout
    facts = proxy_env(str(env_dir))
    assert facts.mitmproxy == "11.0.2" and {"platformdirs", "uvloop"} <= facts.dists
    ver = subprocess.run([str(env_dir / "bin" / "python"), "-c", "import mitmproxy.version as v; print(v.VERSION)"],
                         capture_output=True, text=True, timeout=120)
    assert ver.stdout.strip() == "11.0.2", ver.stderr
    before = _tree(env_dir)
    started = time.monotonic()
    second = capsem("setup", "--no-image", "--proxy-env", str(env_dir))
    again = time.monotonic() - started
    assert second.returncode == 0, second.stdout + second.stderr
    assert "done: nothing (all was already there)" in second.stdout, second.stdout
    assert "already there: host packages, vhost-device-vsock, egress proxy env" in second.stdout
    assert _tree(env_dir) == before
    print(f"capsem setup: proxy env from nothing {made:.1f}s, second run {again:.2f}s")


@root_only
@pytest.mark.slow  # as a normal user without a system proxy env: makes the user's own (about a minute)
def test_a_normal_user_without_a_system_proxy_env_makes_its_own(world_dir):
    """No system env (CAPSEM_SYSTEM_PREFIX: an empty place instead of /opt/capsem): the user's
    `capsem setup` makes one in its data dir, owned by it, which its proxy service then uses; a
    second run changes nothing. (With a system env the user's plan says it serves: test_setup_plan.)"""
    user = User(world_dir / "home")
    user.env["CAPSEM_SYSTEM_PREFIX"] = str(world_dir / "opt")
    own = user.home / "data" / "proxy-venv"
    started = time.monotonic()
    first = user.capsem("setup", "--no-image")
    took = time.monotonic() - started
    assert first.returncode == 0, first.stdout + first.stderr
    assert f"create {own}" in first.stdout, first.stdout
    assert proxy_env(str(own)).mitmproxy == "11.0.2"
    assert own.stat().st_uid == user.entry.pw_uid and not (world_dir / "opt").exists()
    before = _tree(own)
    second = user.capsem("setup", "--no-image")
    assert second.returncode == 0 and "done: nothing (all was already there)" in second.stdout, second.stdout
    assert _tree(own) == before
    code = ("import site, sys\n"
            f"if {user.site!r}: site.addsitedir({user.site!r})\n"
            "from capsem_vm.proxy.service import find_proxy_python; print(find_proxy_python())")
    out = subprocess.run(user.prefix + ["env", "-i", *(f"{k}={v}" for k, v in user.env.items()),
                                        user.python, "-c", code], capture_output=True, text=True, timeout=120,
                         cwd="/")
    assert out.stdout.strip() == f"{own}/bin/python", out
    print(f"capsem setup as a normal user: own proxy env from nothing (empty pip cache) {took:.1f}s")


@pytest.mark.vm  # needs the default image (built by `make image` before the VM tier)
@root_only
def test_setup_retires_images_of_an_older_builder_and_keeps_the_data(world_dir):
    from capsem_vm import paths
    from capsem_vm.image import store
    from capsem_vm.image.build import image_key
    from capsem_vm.image.recipe import make_recipe
    key = image_key(make_recipe())
    source = paths.system_cache_dir() / "images" / key
    if not (source / "manifest.json").is_file():
        pytest.fail(f"no current image at {source} (run `make image`)")
    cache, data = world_dir / "cache", world_dir / "data"
    env = {"CAPSEM_CACHE_DIR": str(cache), "CAPSEM_DATA_DIR": str(data), "CAPSEM_CONFIG_DIR": str(world_dir / "cfg")}
    images = cache / "images"
    for name, builder in ((key, None), ("olderbuilder", 1), ("oldbuilder", 2)):
        (images / name).mkdir(parents=True)
        for f in source.iterdir():
            store.link_or_copy(f, images / name / f.name)
        if builder is not None:
            (images / name / "manifest.json").unlink()
            manifest = json.loads((source / "manifest.json").read_text())
            manifest["builder_version"] = builder
            (images / name / "manifest.json").write_text(json.dumps(manifest))
    (images / "default").symlink_to(key)
    assert capsem("image", "key", env=env).returncode == 0  # a real signing key in the data dir
    kept = _tree(data)
    assert kept
    first = capsem("setup", "--no-packages", "--no-proxy-env", "--image", env=env)
    assert first.returncode == 0, first.stdout + first.stderr
    assert "VM image: already there" in first.stdout and "older images: done" in first.stdout, first.stdout
    assert sorted(p.name for p in images.iterdir()) == sorted([key, "default"])
    assert _tree(data) == kept
    second = capsem("setup", "--no-packages", "--no-proxy-env", "--image", env=env)
    assert second.returncode == 0 and "done: nothing (all was already there)" in second.stdout, second.stdout


@root_only
def test_uninstall_removes_exactly_capsems_things(world_dir):
    user = User(world_dir / "home")
    home = user.home

    def own(path: Path, text: str | None = None, mode=0o700) -> Path:
        if text is None:
            path.mkdir(parents=True, mode=mode)
        else:
            path.parent.mkdir(parents=True, exist_ok=True, mode=mode)
            path.write_text(text)
        for p in [path, *path.parents]:
            if p == home:
                break
            os.chown(p, user.entry.pw_uid, user.entry.pw_gid)
        return path

    # what capsem puts there: a kernelspec, the user's image cache, its runtime dir, a proxy env
    # (a stand-in: only its place matters here), a real signing key, a policy in capsem's config dir
    assert user.capsem("kernel", "install", "--user").returncode == 0
    spec = home / "jupyter" / "kernels" / "capsem"
    assert (spec / "kernel.json").is_file()
    own(home / "cache" / "images" / "x" / "manifest.json", "{}")
    own(home / "run" / "vm-1" / "sock", "")
    own(home / "data" / "proxy-venv" / "bin" / "python", "")
    assert user.capsem("image", "key").returncode == 0
    own(home / "config" / "policies" / "mine.toml", "[policy]\n")
    # the user's own things, never capsem's to remove
    notebook = own(home / "notebooks" / "analysis.ipynb", "{}")
    policy_outside = own(home / "my-policy.toml", "[policy]\n")
    other_spec = own(home / "jupyter" / "kernels" / "python3" / "kernel.json",
                     json.dumps({"argv": ["python3"], "display_name": "Python 3", "language": "python"}))

    dry = user.capsem("uninstall", "--dry-run")
    assert dry.returncode == 0, dry.stdout + dry.stderr
    listed = [line.split(": ", 2)[-1] for line in dry.stdout.splitlines() if "would remove" in line]
    assert sorted(listed) == sorted(map(str, [spec, home / "cache", home / "data" / "proxy-venv", home / "run"]))
    assert "kept CA, signing keys and audit database" in dry.stdout
    assert (home / "cache").exists() and spec.exists()  # a dry run removes nothing

    out = user.capsem("uninstall")
    assert out.returncode == 0, out.stdout + out.stderr
    for gone in (spec, home / "cache", home / "data" / "proxy-venv", home / "run"):
        assert not gone.exists(), gone
    data_files = _tree(home / "data")
    assert data_files and (home / "config" / "policies" / "mine.toml").exists()

    refused = user.capsem("uninstall", "--data")  # no terminal to confirm on, no --yes
    assert refused.returncode == 1 and "--yes" in refused.stderr
    assert _tree(home / "data") == data_files

    purge = user.capsem("uninstall", "--data", "--yes")
    assert purge.returncode == 0, purge.stdout + purge.stderr
    assert not (home / "data").exists() and not (home / "config").exists()
    assert notebook.read_text() == "{}" and policy_outside.exists() and other_spec.exists()
    # (.ipython: IPython's, made when `capsem kernel install` imported it)
    assert sorted(p.name for p in home.iterdir() if p.name != ".ipython") == ["jupyter", "my-policy.toml",
                                                                               "notebooks"]


@root_only
def test_uninstall_dry_run_as_root_lists_the_system_parts_too(world_dir):
    env = {k: str(world_dir / v) for k, v in (("CAPSEM_CACHE_DIR", "cache"), ("CAPSEM_SYSTEM_CACHE_DIR", "syscache"),
                                              ("CAPSEM_SYSTEM_PREFIX", "opt"), ("CAPSEM_DATA_DIR", "data"),
                                              ("CAPSEM_CONFIG_DIR", "cfg"), ("CAPSEM_RUNTIME_DIR", "rt"),
                                              ("JUPYTER_DATA_DIR", "jupyter"))}
    for v in ("cache", "syscache", "opt/proxy-venv", "data", "cfg", "rt"):
        (world_dir / v).mkdir(parents=True)
    out = capsem("uninstall", "--dry-run", env=env)
    assert out.returncode == 0, out.stdout + out.stderr
    for what in ("syscache", "opt", "rt", "cache"):
        assert f": {world_dir / what}\n" in out.stdout + "\n", out.stdout
    assert all((world_dir / v).exists() for v in ("cache", "syscache", "opt", "data", "cfg", "rt"))


@root_only
@pytest.mark.slow  # fetches Debian unstable's package lists (a few seconds to a minute)
def test_vhost_device_vsock_is_fetched_where_the_release_lacks_it(world_dir):
    """The step root's setup runs when no vhost-device-vsock is found: on Debian 12 (no package) the
    unstable .deb, unpacked to the destination with the system's apt sources untouched."""
    from capsem_vm.setup.plan import Step
    from capsem_vm.setup.steps import install_vsock
    if subprocess.run(["apt-cache", "show", "vhost-device-vsock"], capture_output=True).returncode == 0:
        pytest.skip("this release packages vhost-device-vsock: setup would install the package system-wide")
    sources = {p: p.read_bytes() for p in Path("/etc/apt").rglob("*.list*") if p.is_file()}
    dest = world_dir / "opt" / "bin" / "vhost-device-vsock"
    install_vsock(Step("vsock", "vhost-device-vsock", "do", data={"dest": str(dest)}))
    out = subprocess.run([str(dest), "--version"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0 and out.stdout.startswith("vhost-device-vsock"), out
    assert dest.stat().st_mode & 0o777 == 0o755
    assert {p: p.read_bytes() for p in Path("/etc/apt").rglob("*.list*") if p.is_file()} == sources
