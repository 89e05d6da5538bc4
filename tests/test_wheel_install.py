"""The wheel as a pip user gets it: built from this checkout, installed into a fresh venv (made with
the system Python) in a temporary folder outside the checkout, run from another directory with
no PYTHONPATH. It carries everything it needs at run time (the guest agent, the labextension, the
server config) and never reaches back into the source tree; its proxy child imports capsem's own
packages and nothing else of the Jupyter env.

Slow-ish (about a minute: the wheel, a venv, its dependencies from the package index) but needs
no VM image. Skips where the system Python or the package index is unavailable."""

from __future__ import annotations

import json
import shlex
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from capsem_vm.image.agent_source import find_agent_tree
from capsem_vm.image.initramfs import agent_entries, agent_files_digest
from capsem_vm.proxy.service import PROXY_REQUIREMENTS, find_proxy_python

from host_helpers import clean_env, installed_wheel, make_readable, run_as_user, server_on_this_machine, user_proxy_python

CHECKOUT = Path(__file__).resolve().parents[1]

pytestmark = [pytest.mark.timeout(900), pytest.mark.slow]  # slow: builds the wheel and a venv (~30 s)


@pytest.fixture(scope="module")
def installed():
    """Built and installed once per test run (host_helpers.installed_wheel), shared with
    tests/test_normal_user.py."""
    return installed_wheel()


def run(installed, argv, env_extra=None, **kw):
    return subprocess.run(argv, capture_output=True, text=True, timeout=300, cwd=installed["cwd"],
                          env=clean_env(installed["home"], **(env_extra or {})), **kw)


def py(installed, code, *args, env_extra=None):
    out = run(installed, [str(installed["venv"] / "bin" / "python"), "-c", code, *args], env_extra)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    return out.stdout


def test_the_code_comes_from_the_venv(installed):
    venv = installed["venv"].resolve()
    found = json.loads(py(installed, "import json, capsem_vm, capsem_kernel, capsem_agent, sys; "
                                     "print(json.dumps([m.__file__ for m in (capsem_vm, capsem_kernel, capsem_agent)] + sys.path))"))
    for f in found[:3]:
        assert Path(f).resolve().is_relative_to(venv), f
    assert not any(p and Path(p).resolve().is_relative_to(CHECKOUT) for p in found[3:]), found


def test_cli_runs_from_any_directory(installed):
    capsem = str(installed["venv"] / "bin" / "capsem")
    out = run(installed, [capsem, "--help"])
    assert out.returncode == 0 and "image" in out.stdout, out.stderr
    out = run(installed, [str(installed["venv"] / "bin" / "python"), "-m", "capsem_vm", "--help"])
    assert out.returncode == 0 and "image" in out.stdout, out.stderr
    # doctor gives the same verdict as from the checkout (host facts, not where the code is)
    mine = subprocess.run([sys.executable, "-m", "capsem_vm", "doctor"], capture_output=True, text=True,
                          timeout=300, env=clean_env(installed["home"], PYTHONPATH=f"{CHECKOUT}:{CHECKOUT / 'guest-agent'}"))
    theirs = run(installed, [capsem, "doctor"])
    assert "Traceback" not in theirs.stderr, theirs.stderr
    assert theirs.returncode == mine.returncode, (theirs.stdout + theirs.stderr, mine.stdout + mine.stderr)


ENTRIES = """
import hashlib, json, sys
from capsem_vm.image.agent_source import find_agent_tree
from capsem_vm.image.initramfs import agent_entries, agent_files_digest
tree = find_agent_tree()
files = tree.files()
print(json.dumps({"boot_dir": str(tree.boot_dir), "package_dir": str(tree.package_dir),
                  "digest": agent_files_digest(tree),
                  "init": hashlib.sha256(files[0].path.read_bytes()).hexdigest(),
                  "entries": [[rel, hashlib.sha256(data).hexdigest(), mode] for rel, data, mode in agent_entries(files[1:])]}))
"""


def test_agent_files_ship_in_the_wheel_and_pack_byte_identically(installed):
    """The wheel's agent tree is the checkout's: same digest (so both share the cached images,
    for the same Python) and, packed by the same interpreter, the same initramfs entries."""
    venv = installed["venv"].resolve()
    wheel = json.loads(py(installed, ENTRIES))
    assert Path(wheel["boot_dir"]).is_relative_to(venv) and Path(wheel["package_dir"]).is_relative_to(venv)
    checkout = json.loads(py(installed, ENTRIES, env_extra={"PYTHONPATH": f"{CHECKOUT}:{CHECKOUT / 'guest-agent'}"}))
    assert Path(checkout["boot_dir"]) == CHECKOUT / "guest-agent"
    assert wheel["digest"] == checkout["digest"] == agent_files_digest(find_agent_tree())
    assert wheel["init"] == checkout["init"]
    assert wheel["entries"] == checkout["entries"]
    names = {rel for rel, _, _ in wheel["entries"]}
    assert {"capsem-agent", "capsem_agent/supervisor.py", "capsem_agent/protocol.py"} <= names
    assert dict((rel, mode) for rel, _, mode in wheel["entries"])["capsem-agent"] == 0o755


def test_the_agent_tree_is_all_of_guest_agent():
    """Nothing in guest-agent/ is left behind by the new enumeration (the wheel ships exactly this)."""
    root = CHECKOUT / "guest-agent"
    on_disk = set()
    for d, dirs, names in os.walk(root):
        dirs[:] = [x for x in dirs if x != "__pycache__" and not x.startswith(".")]
        on_disk |= {(Path(d) / n).relative_to(root).as_posix() for n in names
                    if not n.endswith(".pyc") and not n.startswith(".")}
    tree = find_agent_tree()
    assert {f.rel for f in tree.files()} == on_disk
    assert [f.rel for f in tree.files()][:2] == ["init", "capsem-agent"]
    assert all(mode in (0o644, 0o755) for _, _, mode in agent_entries(tree.files()))


CHILD = """
import asyncio, json, os, sys
from capsem_vm.proxy.service import ProxyService
async def main():
    svc = ProxyService(workers=1, audit_db=sys.argv[1], ca_dir=sys.argv[2], log_path=sys.argv[3])
    await svc.start()
    try:
        pid = svc.pids[0]
        env = dict(e.split("=", 1) for e in open(f"/proc/{pid}/environ").read().split("\\0") if "=" in e)
        maps = sorted({line.split()[-1] for line in open(f"/proc/{pid}/maps") if "/" in line})
        code = env["PYTHONPATH"]
        print(json.dumps({"pythonpath": code, "entries": {n: os.readlink(os.path.join(code, n)) for n in os.listdir(code)},
                          "maps": maps, "env": env, "exe": os.readlink(f"/proc/{pid}/exe")}))
    finally:
        await svc.close()
asyncio.run(main())
"""


def test_proxy_child_gets_only_capsem_code(installed, tmp_path):
    venv = installed["venv"].resolve()
    site = Path(py(installed, "import sysconfig; print(sysconfig.get_paths()['purelib'])").strip()).resolve()
    proxy_python = find_proxy_python()
    got = json.loads(py(installed, CHILD, str(tmp_path / "audit.sqlite3"), str(tmp_path / "ca"), str(tmp_path / "proxy.log"),
                        env_extra={"CAPSEM_PROXY_PYTHON": proxy_python}))
    assert got["entries"] == {"capsem_vm": str(site / "capsem_vm"), "capsem_agent": str(site / "capsem_agent")}
    assert Path(got["pythonpath"]).resolve().is_relative_to((installed["home"] / "run").resolve())
    assert ":" not in got["pythonpath"] and "PYTHONHOME" not in got["env"]
    # nothing the child loaded (its interpreter, extension modules) comes from the Jupyter venv
    assert not [m for m in got["maps"] if Path(m).is_relative_to(venv)], got["maps"]
    # and what the child's interpreter puts on sys.path with that environment has no site-packages of it
    child_path = subprocess.run([proxy_python, "-c", "import json, sys; print(json.dumps(sys.path))"],
                                capture_output=True, text=True, timeout=60, env=got["env"], check=True).stdout
    assert not [p for p in json.loads(child_path) if p and Path(p).resolve().is_relative_to(venv)], child_path


def test_missing_proxy_env_says_what_a_pip_user_does(installed):
    out = run(installed, [str(installed["venv"] / "bin" / "python"), "-c",
                          "from capsem_vm.proxy.service import find_proxy_python; find_proxy_python()"])
    assert out.returncode != 0
    assert "make proxy-venv`;" in out.stderr  # only as the checkout's way, after the pip user's
    # the exact install command, requirements shell-quoted (their markers hold quotes)
    pip_install = "pip install " + " ".join(map(shlex.quote, PROXY_REQUIREMENTS))
    assert "CAPSEM_PROXY_PYTHON" in out.stderr and pip_install in out.stderr and "mitmproxy==11.0.2" in out.stderr
    assert str(installed["home"] / "data" / "proxy-venv") in out.stderr


def test_proxy_requirements_are_the_proxy_extra():
    extra = tomllib.loads((CHECKOUT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["proxy"]
    assert sorted(extra) == sorted(PROXY_REQUIREMENTS)


def test_wheel_ships_the_labextension_and_server_config(installed):
    import zipfile
    names = zipfile.ZipFile(installed["wheel"]).namelist()
    data = [n.split(".data/data/", 1)[1] for n in names if ".data/data/" in n]
    assert "etc/jupyter/jupyter_server_config.d/capsem_kernel.json" in data
    assert "share/jupyter/labextensions/@capsem/jupyterlab-capsem/package.json" in data
    assert "share/jupyter/labextensions/@capsem/jupyterlab-capsem/install.json" in data
    assert {"capsem_vm/image/agent_boot/init", "capsem_vm/image/agent_boot/capsem-agent"} <= set(names)
    venv = installed["venv"]
    assert (venv / "share/jupyter/labextensions/@capsem/jupyterlab-capsem/static/style.js").is_file()
    assert (venv / "etc/jupyter/jupyter_server_config.d/capsem_kernel.json").is_file()


def test_child_code_dir_holds_exactly_the_two_packages_and_is_reused(tmp_path):
    from capsem_vm.proxy.child_code import child_code_dir, package_dirs
    runtime = tmp_path / "run"
    first = child_code_dir(runtime)
    assert child_code_dir(runtime) == first
    assert sorted(os.listdir(first)) == ["capsem_agent", "capsem_vm"]
    assert {n: Path(os.readlink(first / n)) for n in os.listdir(first)} == package_dirs()
    assert (first.stat().st_mode & 0o777) == 0o700 and [p.name for p in runtime.iterdir()] == [first.name]


@pytest.mark.parametrize("in_the_way", ["file", "other_dir", "symlink"])
def test_child_code_dir_refuses_what_it_did_not_make(tmp_path, in_the_way):
    from capsem_vm.errors import CapsemError
    from capsem_vm.proxy.child_code import child_code_dir
    runtime = tmp_path / "run"
    final = child_code_dir(runtime)
    shutil.rmtree(final)
    if in_the_way == "file":
        final.write_text("x")
    elif in_the_way == "other_dir":
        final.mkdir()
        (final / "capsem_vm").symlink_to(tmp_path)       # points elsewhere
        (final / "capsem_agent").symlink_to(tmp_path)
    else:
        final.symlink_to(tmp_path)
    with pytest.raises(CapsemError, match="in the way"):
        child_code_dir(runtime)
    assert not [p for p in runtime.iterdir() if p.name.startswith(".proxy-code-")]  # no leftovers


@pytest.mark.vm
def test_vm_run_with_a_share_from_the_installed_wheel(installed, tmp_path):
    """`capsem vm run --share DIR` from the wheel: the guest reads and writes the folder. The image is
    the checkout's cached one (the wheel's own key differs when its Python's version differs)."""
    from capsem_vm.image.build import build_image
    from capsem_vm.image.recipe import Recipe
    image = build_image(Recipe())
    share = tmp_path / "share"
    share.mkdir()
    (share / "from_host.txt").write_text("host")
    passthrough = {k: v for k, v in os.environ.items() if k in ("CAPSEM_VIRTIOFSD", "CAPSEM_CACHE_DIR", "CAPSEM_SYSTEM_CACHE_DIR")}
    out = run(installed, [str(installed["venv"] / "bin" / "capsem"), "vm", "run", "-q", "--share", str(share),
                          "--image", str(image), "--", "sh", "-c", "cat from_host.txt; echo guest > from_guest.txt"],
              env_extra={"CAPSEM_PROXY_PYTHON": find_proxy_python(), **passthrough})
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    assert "host" in out.stdout
    assert (share / "from_guest.txt").read_text() == "guest\n"


USER_SCRIPT = """
set -e
cd "$HOME"
python -c 'import capsem_vm, sys; print("FILE", capsem_vm.__file__)'
if cat {checkout}/pyproject.toml >/dev/null 2>&1; then echo "CHECKOUT READABLE"; exit 1; fi
capsem doctor
capsem vm run -q --share "$HOME/share" --policy "$HOME/policy.toml" -- sh -c \\
  'cat from_host.txt; echo guest > from_guest.txt; python3 -c "import urllib.request; print(urllib.request.urlopen(\\"{url}\\", timeout=60).read().decode())"'
capsem audit --json --limit 100
"""


@pytest.mark.vm
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run as another user")
def test_an_unprivileged_user_runs_the_installed_wheel(installed):
    """As a user with no supplementary groups who cannot read the checkout (hidden by a tmpfs in a
    mount namespace): the code is the venv's, `capsem doctor` passes, `capsem vm run --share`
    reads and writes the folder, and an allowed fetch from a real server on this machine goes
    through the proxy (the user's own proxy env) with an audit row."""
    import pwd

    from test_kernel_user import USER, ensure_user
    user = ensure_user()
    assert os.getgrouplist(USER, user.pw_gid) == [user.pw_gid]
    root = installed["root"]
    proxy_python = user_proxy_python()
    make_readable(root)
    home = root / "user-home"
    (home / "share").mkdir(parents=True)
    (home / "share" / "from_host.txt").write_text("host\n")
    www = root / "www"
    www.mkdir()
    (www / "hello.txt").write_text("hello from this machine")
    with server_on_this_machine(www) as (addr, port):
        url = f"http://{addr}:{port}/hello.txt"
        (home / "policy.toml").write_text(
            f'[[rule]]\nname = "here"\nhost = "{addr}"\nport = {port}\naddresses = ["{addr}"]\n'
            f'action = "allow"\nreason = "a server on this machine"\n')
        subprocess.run(["chown", "-R", f"{user.pw_uid}:{user.pw_gid}", str(home)], check=True)
        os.chmod(home, 0o700)
        env = {"PATH": f"{installed['venv'] / 'bin'}:/usr/bin:/bin", "HOME": str(home), "LANG": "C.UTF-8",
               "CAPSEM_PROXY_PYTHON": str(proxy_python)}
        env |= {k: v for k, v in os.environ.items() if k in ("CAPSEM_VIRTIOFSD",)}
        out = run_as_user(USER, USER_SCRIPT.format(checkout=CHECKOUT, url=url), env)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    lines = out.stdout.splitlines()
    file_line = next(line for line in lines if line.startswith("FILE "))
    assert Path(file_line[5:]).is_relative_to(installed["venv"]), file_line
    assert "all checks passed" in out.stdout
    assert "host" in lines and "hello from this machine" in lines
    assert (home / "share" / "from_guest.txt").read_text() == "guest\n"
    assert (home / "share" / "from_guest.txt").stat().st_uid == user.pw_uid
    rows = [json.loads(line) for line in lines if line.startswith("{")]
    assert any(r.get("url") == url and r.get("decision") == "allow" for r in rows), rows[-5:]
    assert pwd.getpwuid(os.stat(home / ".local" / "share" / "capsem" / "audit.sqlite3").st_uid).pw_name == USER
