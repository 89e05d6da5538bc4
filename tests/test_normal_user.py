"""A normal user end to end, from the installed wheel (issue 16's Done-means): the wheel built once
per run and installed into a fresh venv outside the checkout (host_helpers.installed_wheel, shared
with test_wheel_install.py), run as `capsemtest` (no supplementary groups, not root) in a mount
namespace where the checkout is an empty tmpfs, with the user's own proxy env. After root built the
system image once (`make vm` does), that user

- builds their own image (`capsem image build`: the system's kernel and rootfs layers are reused
  read-only, the initramfs is built from the wheel's agent; a user who could not build a rootfs
  without root is told exactly what is missing, before any download),
- runs kernels from nbclient whose policy allows a real server on this machine: the fetch goes
  through the proxy, a refused path gets a 403 with its reason, both audited in the user's own DB,
- runs `capsem pool` (start, a kernel claimed warm, stop) with the runtime dir 0700 under
  XDG_RUNTIME_DIR, and leaves nothing owned by anyone else.

The full rootfs build as a user (mmdebstrap --mode=unshare, minutes) runs with
CAPSEM_TEST_FULL_USER_BUILD=1 (`make user-build-test`)."""

from __future__ import annotations

import json
import os
import pwd
import re
import subprocess
import time
from pathlib import Path

import pytest

from host_helpers import (REPO, helper_processes, installed_wheel, make_readable, owned_by_others, run_as_user,
                          server_on_this_machine, user_proxy_python)

pytestmark = [pytest.mark.vm, pytest.mark.timeout(1200),
              pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run as another user")]

SECRET_REASON = "secrets stay on this machine"


class World:
    """The user, the installed wheel, a server on this machine and the policy that names it."""

    def __init__(self, user: pwd.struct_passwd, installed: dict, proxy_python: Path, addr: str, port: int):
        self.user, self.installed, self.proxy_python = user, installed, proxy_python
        self.addr, self.port = addr, port
        self.url = f"http://{addr}:{port}/hello.txt"
        self.secret_url = f"http://{addr}:{port}/secret/key.txt"

    def home(self, name: str, files: dict[str, str] | None = None) -> Path:
        """A fresh home directory of the user's (0700) with the policy and `files` in it."""
        home = self.installed["root"] / name
        (home / "notebooks").mkdir(parents=True, exist_ok=True)
        for rel, text in (files or {}).items():
            (home / rel).write_text(text)
        (home / "policy.toml").write_text(
            f'[[rule]]\nname = "secret"\nhost = "{self.addr}"\nport = {self.port}\npaths = ["/secret*"]\n'
            f'action = "deny"\nreason = "{SECRET_REASON}"\n\n'
            f'[[rule]]\nname = "here"\nhost = "{self.addr}"\nport = {self.port}\naddresses = ["{self.addr}"]\n'
            f'action = "allow"\nreason = "a server on this machine"\n')
        subprocess.run(["chown", "-R", f"{self.user.pw_uid}:{self.user.pw_gid}", str(home)], check=True)
        os.chmod(home, 0o700)
        return home

    def env(self, home: Path, extra_env: dict | None = None) -> dict[str, str]:
        env = {"PATH": f"{self.installed['venv'] / 'bin'}:/usr/bin:/bin", "HOME": str(home), "LANG": "C.UTF-8",
               "CAPSEM_PROXY_PYTHON": str(self.proxy_python), **(extra_env or {})}
        return env | {k: v for k, v in os.environ.items() if k in ("CAPSEM_VIRTIOFSD",)}

    # every script of the user's first proves that the checkout is out of reach
    PROLOGUE = (f"set -e\ncd \"$HOME\"\nif cat {REPO}/pyproject.toml >/dev/null 2>&1; then "
                "echo 'the checkout is readable' >&2; exit 99; fi\n")

    def run(self, home: Path, script: str, *, extra_env: dict | None = None, binds=(), timeout: float = 600):
        t0 = time.monotonic()
        out = run_as_user(self.user.pw_name, self.PROLOGUE + script, self.env(home, extra_env), binds=binds,
                          timeout=timeout)
        out.seconds = time.monotonic() - t0
        return out

    def audit(self, home: Path) -> list[dict]:
        out = self.run(home, "capsem audit --json --limit 200")
        assert out.returncode == 0, out.stderr[-2000:]
        return [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]


@pytest.fixture(scope="module")
def world():
    from test_kernel_user import USER, ensure_user
    user = ensure_user()
    assert user.pw_uid != 0 and os.getgrouplist(USER, user.pw_gid) == [user.pw_gid]
    installed = installed_wheel()
    proxy_python = user_proxy_python()
    # nbclient is what the user runs notebooks with (a test extra, not a dependency of the wheel)
    pip = subprocess.run([str(installed["venv"] / "bin" / "pip"), "install", "-q", "nbclient>=0.10"],
                         capture_output=True, text=True, timeout=600)
    assert pip.returncode == 0, pip.stderr[-3000:]
    make_readable(installed["root"])
    www = installed["root"] / "www-normal-user"
    (www / "secret").mkdir(parents=True, exist_ok=True)  # the lab module builds this world too
    (www / "hello.txt").write_text("hello from this machine")
    (www / "secret" / "key.txt").write_text("the key")
    make_readable(www)
    with server_on_this_machine(www) as (addr, port):
        yield World(user, installed, proxy_python, addr, port)


def _system_layers_built() -> bool:
    from capsem_vm import paths
    from capsem_vm.image.recipe import Recipe
    return (paths.system_cache_dir() / "layers" / "rootfs" / Recipe().rootfs_key() / "rootfs.erofs").is_file()


def test_the_user_builds_their_own_image(world, record_property):
    if not _system_layers_built():
        pytest.skip("root has not built the system image (make image); the full user build is `make user-build-test`")
    home = world.home("nu-image")
    out = world.run(home, "capsem image build\ncapsem image verify\ncapsem image list")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    record_property("user_image_build_s", round(out.seconds, 1))
    print(f"user image build (system layers reused): {out.seconds:.1f} s")
    built = Path(out.stdout.splitlines()[0])
    assert built.parent == home / ".cache" / "capsem" / "images", out.stdout
    assert "rootfs: cached (the system's" in out.stderr and "(cached, the system's" in out.stderr, out.stderr
    assert "initramfs: modules, busybox, agent" in out.stderr  # built here, from the wheel's agent
    assert "verified:" in out.stdout and built.name in out.stdout
    assert (home / ".cache" / "capsem" / "images" / "default").resolve() == built
    assert not owned_by_others(home, world.user.pw_uid)


def test_a_user_who_cannot_build_without_root_is_told_what_is_missing_at_once(world):
    """/etc/subuid and /etc/subgid without the user's ranges (empty files mounted over them, so
    newuidmap is refused too): the build stops before any download, naming both and root's fix."""
    home = world.home("nu-nosubids")
    empty = world.installed["root"] / "empty-subids"
    empty.write_text("")
    empty.chmod(0o644)
    out = world.run(home, "capsem image build --apt jq", binds=((empty, "/etc/subuid"), (empty, "/etc/subgid")),
                    timeout=120)
    assert out.returncode != 0 and "Traceback" not in out.stderr, out.stderr[-3000:]
    for name, option in (("subuid", "--add-subuids"), ("subgid", "--add-subgids")):
        assert f"/etc/{name} has no entry for user '{world.user.pw_name}', 65536 needed" in out.stderr, out.stderr
        assert f"usermod {option} 100000-165535 {world.user.pw_name}" in out.stderr, out.stderr
    assert "apt: update" not in out.stderr and not (home / ".cache" / "capsem" / "apt").exists(), out.stderr
    assert out.seconds < 30, out.seconds


NOTEBOOK = r"""
import json, sys, time
import nbformat
from nbclient import NotebookClient
url, secret_url, kernel = sys.argv[1:4]
cells = [
    "import urllib.request\nprint(urllib.request.urlopen(%r, timeout=60).read().decode())" % url,
    "import urllib.error\ntry:\n    urllib.request.urlopen(%r, timeout=60)\nexcept urllib.error.HTTPError as e:\n"
    "    print(e.code, e.headers.get('X-Capsem-Policy'))" % secret_url,
    "open('from_the_kernel.txt', 'w').write('kernel')",
]
nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in cells])
ready = []
client = NotebookClient(nb, kernel_name=kernel, timeout=300, startup_timeout=600,
                        resources={"metadata": {"path": "notebooks"}},
                        on_notebook_start=lambda **kw: ready.append(time.monotonic() - t0))  # kernel up, no cell run
t0 = time.monotonic()
client.execute()
out = [[o.get("text", "") for o in c.outputs] for c in nb.cells]
print("RESULT " + json.dumps({"ready_s": ready[0], "outputs": out}))
"""


def _result(out) -> dict:
    line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
    assert line, out.stdout[-3000:] + out.stderr[-3000:]
    return json.loads(line[7:])


def _check_egress(world, home: Path, got: dict) -> None:
    outputs = got["outputs"]
    assert outputs[0] == ["hello from this machine\n"], outputs
    assert outputs[1] == [f'403 deny; rule="secret"; reason="{SECRET_REASON}"\n'], outputs
    assert (home / "notebooks" / "from_the_kernel.txt").read_text() == "kernel"
    assert (home / "notebooks" / "from_the_kernel.txt").stat().st_uid == world.user.pw_uid
    rows = world.audit(home)
    assert any(r.get("url") == world.url and r.get("decision") == "allow" and r.get("status") == 200 for r in rows), rows
    assert any(r.get("url") == world.secret_url and r.get("decision") == "deny" and r.get("status") == 403
               and r.get("reason") == SECRET_REASON for r in rows), rows
    db = home / ".local" / "share" / "capsem" / "audit.sqlite3"
    assert db.stat().st_uid == world.user.pw_uid and not db.stat().st_mode & 0o077


def test_kernels_from_nbclient_reach_a_server_through_the_proxy(world, record_property):
    """The same provisioner serves JupyterLab and jupyter console: the kernelspec the user
    installed, a cold VM, egress only by the policy, audited in the user's own database."""
    home = world.home("nu-kernel", {"run_nb.py": NOTEBOOK})
    out = world.run(home, f"""
capsem kernel install --user --policy "$HOME/policy.toml"
jupyter kernelspec list --json | python -c 'import json, sys; print("SPEC", json.load(sys.stdin)["kernelspecs"]["capsem"]["resource_dir"])'
python run_nb.py {world.url} {world.secret_url} capsem
""")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    spec = next(x for x in out.stdout.splitlines() if x.startswith("SPEC "))[5:]
    assert Path(spec).is_relative_to(home / ".local" / "share" / "jupyter" / "kernels"), spec
    got = _result(out)
    record_property("user_kernel_cold_start_s", round(got["ready_s"], 1))
    print(f"user kernel cold start (nbclient, until on_notebook_start): {got['ready_s']:.1f} s")
    _check_egress(world, home, got)
    # no XDG_RUNTIME_DIR and no /run/user/UID: the runtime dir falls back to the user's data dir
    run = home / ".local" / "share" / "capsem" / "run"
    assert run.stat().st_uid == world.user.pw_uid and (run.stat().st_mode & 0o777) == 0o700
    assert not owned_by_others(home, world.user.pw_uid)
    assert not helper_processes(str(home))


POOL = """
capsem kernel install --user --name capsem-pool --pool --policy "$HOME/policy.toml"
trap 'capsem pool stop' EXIT
capsem pool start --size 1 --wait
stat -c 'MODE %a %u %n' "$XDG_RUNTIME_DIR/capsem" "$XDG_RUNTIME_DIR/capsem/pool" "$XDG_RUNTIME_DIR/capsem/pool/pool.sock"
python run_nb.py {url} {secret_url} capsem-pool
capsem pool status --json | python -c 'import json, sys; s = json.load(sys.stdin); print("CLAIMS", s["claims"])'
"""


def test_the_pool_as_a_user_serves_a_warm_kernel_and_leaves_nothing_behind(world, record_property):
    home = world.home("nu-pool", {"run_nb.py": NOTEBOOK})
    xdg = world.installed["root"] / "nu-xdg"
    xdg.mkdir(mode=0o700)
    os.chown(xdg, world.user.pw_uid, world.user.pw_gid)
    out = world.run(home, POOL.format(url=world.url, secret_url=world.secret_url),
                    extra_env={"XDG_RUNTIME_DIR": str(xdg)})
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "capsem pool stopped" in out.stdout
    modes = {Path(line.split()[3]).name: line.split()[1:3] for line in out.stdout.splitlines() if line.startswith("MODE ")}
    uid = str(world.user.pw_uid)
    assert modes == {"capsem": ["700", uid], "pool": ["700", uid], "pool.sock": ["600", uid]}, modes
    assert "CLAIMS 1" in out.stdout.splitlines(), out.stdout[-2000:]
    got = _result(out)
    record_property("user_pooled_kernel_ready_s", round(got["ready_s"], 2))
    print(f"user kernel from the pool (nbclient, until on_notebook_start): {got['ready_s']:.2f} s")
    _check_egress(world, home, got)
    # nothing of root's (or anyone's) in the user's dirs; no VM dir, helper or pool left running
    assert not owned_by_others(home, world.user.pw_uid) and not owned_by_others(xdg, world.user.pw_uid)
    assert not helper_processes(str(xdg), str(home))
    # what stays by design: the pool's (empty) dir, the proxy child's code links (reused), the
    # proxy logs of the processes that ran one (the pool's, the kernel's)
    left = [p.name for p in (xdg / "capsem").iterdir()
            if p.name != "pool" and not re.fullmatch(r"proxy-code-[0-9a-f]+|proxy-[0-9]+\.log", p.name)]
    assert not left, left
    assert [p.name for p in (xdg / "capsem" / "pool").iterdir()] in ([], ["pool.log"])
    assert not (xdg / "capsem" / "pool" / "pool.sock").exists()


@pytest.mark.skipif(os.environ.get("CAPSEM_TEST_FULL_USER_BUILD") != "1",
                    reason="minutes of mmdebstrap: `make user-build-test` (CAPSEM_TEST_FULL_USER_BUILD=1)")
def test_the_user_builds_a_rootfs_without_root(world, record_property):
    """A recipe whose rootfs nobody built: mmdebstrap --mode=unshare as the user, unpacked and
    packed inside a user namespace, then booted."""
    home = world.home("nu-full-build")
    out = world.run(home, 'image=$(capsem image build --apt jq)\ncapsem vm run -q --image "$image" -- jq --version',
                    timeout=1800)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    record_property("user_full_image_build_s", round(out.seconds, 1))
    print(f"user image build with its own rootfs: {out.seconds:.1f} s")
    assert "rootfs: mmdebstrap" in out.stderr and "jq-1." in out.stdout
    assert not owned_by_others(home, world.user.pw_uid)
