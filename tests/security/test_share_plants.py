"""Repositories planted in the share never make host git run a command (issue 15 items 10, 11).

One real VM for the module. Its share holds the host user's own repositories (top-level, nested,
a worktree's `.git` file, a bare one) and a symlink the host user made. While the guest (root)
plants repositories every way it can — `.git` directories with a config whose core.fsmonitor,
pager, sshCommand, aliases, filters and hooks would run `touch MARKER` on the host, `.git` files
saying `gitdir:`, bare repositories (HEAD + objects + refs + config), renames, hard links and
RENAME_EXCHANGE of each, at depth, in letter-case and other spellings — a host loop runs
`git status` and `git rev-parse` as the folder's owner in every directory of the share. The
marker never appears, git never finds a repository the host user did not make, and the host's
repositories and symlink are unchanged.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import pytest

import guest_scripts as gs
from host_helpers import helper_processes
from kernel_helpers import running_vm, vm_exec

from capsem_vm import repo_names
from capsem_vm.config import Share, VMConfig

pytestmark = pytest.mark.vm
OWNER = 4321  # the share belongs to a non-root user, who runs git on the host
PLANT_SECONDS = 15


class Env:
    pass


def _git(*args: str, cwd: Path | None = None, env=None, check=True) -> subprocess.CompletedProcess:
    return subprocess.run(["git", *args], cwd=cwd, env=env, check=check, capture_output=True, text=True,
                          timeout=60)


def _host_repositories(share: Path) -> set[str]:
    """The host user's repositories: what git may find in the share (absolute git dirs)."""
    ident = ["-c", "user.name=host", "-c", "user.email=host@example.invalid"]
    _git("init", "-q", "-b", "main", str(share))
    (share / "README.md").write_text("host project\n")
    _git(*ident, "-C", str(share), "add", "README.md")
    _git(*ident, "-C", str(share), "commit", "-q", "-m", "init")
    _git("-C", str(share), "worktree", "add", "-q", "wt")                  # wt/.git is a gitdir file
    (share / "sub" / "deep").mkdir(parents=True)
    _git("init", "-q", str(share / "sub" / "deep"))                       # a nested repository
    _git("init", "-q", "--bare", str(share / "lib.git"))                   # a bare one
    return {str(share / ".git"), str(share / ".git" / "worktrees" / "wt"), str(share / "sub" / "deep" / ".git"),
            str(share / "lib.git")}


@pytest.fixture(scope="module")
def env(image_dir):
    e = Env()
    base = Path(tempfile.mkdtemp(prefix="capsem-plants-"))
    os.chmod(base, 0o755)
    e.share = base / "share"
    e.share.mkdir()
    e.repos = _host_repositories(e.share)
    (e.share / "host-link").symlink_to("/etc/hostname")                    # the host user's symlink
    e.home = base / "home"                                                 # the git user's HOME, and
    e.home.mkdir()                                                         # where the marker would land
    e.marker = e.home / "PLANTED-COMMAND-RAN"
    for p in [e.share, *e.share.rglob("*"), e.home]:
        os.chown(p, OWNER, OWNER, follow_symlinks=False)
    e.configs = {p: p.read_bytes() for p in [e.share / ".git" / "config", e.share / "sub" / "deep" / ".git" / "config",
                                            e.share / "lib.git" / "config", e.share / "wt" / ".git"]}
    e.runtime = Path("/tmp") / f"capsem-plants-{os.getpid()}"
    e.runtime.mkdir(mode=0o700)
    try:
        with running_vm(VMConfig(memory_mb=512, cpus=1, shares=(Share(e.share, "nb"),)),
                        {"CAPSEM_RUNTIME_DIR": str(e.runtime)}) as e.vm:
            yield e
    finally:
        assert helper_processes(str(e.runtime), f"source={e.share}") == []
        shutil.rmtree(e.runtime, ignore_errors=True)
        shutil.rmtree(base, ignore_errors=True)


def _as_owner():
    os.setgroups([])
    os.setgid(OWNER)
    os.setuid(OWNER)


def _sweep(e, found: dict[str, str]) -> int:
    """`git status` and `git rev-parse` as the folder's owner in every directory of the share.
    Records every git dir git resolved that is not one of the host's. Returns directories visited."""
    git_env = {"HOME": str(e.home), "PATH": os.environ["PATH"], "GIT_CONFIG_NOSYSTEM": "1", "LC_ALL": "C"}
    dirs = [e.share]
    for root, subdirs, _files in os.walk(e.share, followlinks=False):
        dirs += [Path(root) / d for d in subdirs]
    for d in dirs:
        for argv in (["git", "status", "--porcelain"], ["git", "-C", str(d), "rev-parse", "--absolute-git-dir"]):
            try:
                out = subprocess.run(argv, cwd=d, env=git_env, preexec_fn=_as_owner, capture_output=True,
                                     text=True, timeout=60)
            except (FileNotFoundError, NotADirectoryError):
                continue  # removed meanwhile
            if argv[-1] == "--absolute-git-dir" and out.returncode == 0 and out.stdout.strip() not in e.repos:
                found[str(d)] = out.stdout.strip()
    return len(dirs)


def test_planted_repositories_never_run_a_command_on_the_host(env):
    # the host user makes two more repositories while the VM runs (a clone, a `git init`)
    _git("init", "-q", str(env.share / "later"))
    _git("init", "-q", "--bare", str(env.share / "later.git"))
    for p in [env.share / "later", env.share / "later.git", *(env.share / "later").rglob("*"),
              *(env.share / "later.git").rglob("*")]:
        os.chown(p, OWNER, OWNER)
    env.repos |= {str(env.share / "later" / ".git"), str(env.share / "later.git")}
    later = {p: p.read_bytes() for p in (env.share / "later" / ".git" / "config", env.share / "later.git" / "config")}
    found: dict[str, str] = {}
    sweeps = []
    stop = threading.Event()

    def host_loop():
        while not stop.is_set():
            sweeps.append(_sweep(env, found))

    loop = threading.Thread(target=host_loop, daemon=True)
    loop.start()
    t0 = time.monotonic()
    try:
        code, out, err = vm_exec(env.vm, ["python3", "-c", gs.SHARE_PLANTS, str(env.share), str(env.marker),
                                          str(PLANT_SECONDS)], timeout=300)
    finally:
        stop.set()
        loop.join(120)
    assert code == 0, err
    res = json.loads(out.strip().splitlines()[-1])
    print(f"\n{res.pop('rounds')} guest rounds in {time.monotonic() - t0:.1f} s; {len(sweeps)} host sweeps "
          f"of up to {max(sweeps, default=0)} directories\n" + json.dumps(res, indent=1))
    sweeps.append(_sweep(env, found))  # and once more after the guest is done
    assert not env.marker.exists(), "a planted repository made host git run its command"
    assert found == {}, f"git found repositories the host user did not make: {found}"
    # nothing in the share has a repository's name but the host's own
    planted = [str(p) for p in env.share.rglob("*") if repo_names.repository_name(p.name)
               and not any(str(p) == r or str(p).startswith(r + "/") or str(p) == r + "/HEAD" for r in env.repos)
               and p != env.share / "wt" / ".git"]
    assert planted == []
    # every way of making a repository name failed; ordinary names still work
    ordinary = {"ordinary file", "ordinary dir", "ordinary rename", "prepared dir (HEAD under another name)"}
    for key, outcomes in res.items():
        assert outcomes == ["ok"] if key in ordinary else "ok" not in outcomes, (key, outcomes)
    for key in ("host .git config", "host nested .git config", "host bare config", "host worktree gitdir file"):
        assert res[key] in (["EROFS"], ["EPERM"]), (key, res[key])  # read-only mount; the guard refuses first
    for key in ("later .git config", "later bare config", "later .git config truncate", "later bare config truncate",
                "later .git new hook", "later bare new hook"):
        assert res[key] == ["EPERM"], (key, res[key])
    for p, before in later.items():
        assert p.read_bytes() == before, p
    assert not [p for p in (env.share / "later" / ".git" / "hooks").iterdir() if not p.name.endswith(".sample")]
    # the host's repositories are unchanged
    for p, before in env.configs.items():
        assert p.read_bytes() == before, p


def test_host_symlink_cannot_be_linked_or_renamed_onto_a_guest_name(env):
    code, out, err = vm_exec(env.vm, ["python3", "-c", gs.SHARE_PLANTS, str(env.share), str(env.marker), "-1"],
                             timeout=300)
    assert code == 0, err
    res = json.loads(out.strip().splitlines()[-1])
    for key in ("hard link to host symlink", "rename host symlink", "renameat2 noreplace host symlink",
                "exchange host symlink with a file", "symlink"):
        assert res[key] == ["EPERM"], (key, res[key])
    assert (env.share / "host-link").is_symlink() and os.readlink(env.share / "host-link") == "/etc/hostname"
    assert not (env.share / "analysis.ipynb").is_symlink()
    links = [p for p in env.share.rglob("*") if p.is_symlink()]
    assert links == [env.share / "host-link"]
    hard = [p for p in env.share.rglob("*") if p.is_file() and not p.is_symlink() and p.stat().st_nlink > 1]
    assert hard == [], hard


def test_a_dead_guard_makes_creates_in_the_share_fail_not_hang(env):
    """Destructive (last): the supervisor gone, the kernel fails virtiofsd's notified calls with
    ENOSYS, which the guest sees as errors (writes too: they are checked); reading still works."""
    virtiofsd = next(p for p in env.vm.helpers if p.name == "virtiofsd[nb]")
    virtiofsd.guard.close()
    assert not virtiofsd.guard.alive()
    s = str(env.share)
    script = (f"for n in late.txt HEAD; do (: > {s}/$n); echo \"create $n=$?\"; done; "
              f"mkdir {s}/late-dir; echo mkdir=$?; mv {s}/README.md {s}/moved.md; "
              f"echo rename=$?; cat {s}/README.md; echo appended >> {s}/README.md; echo append=$?")
    t0 = time.monotonic()
    code, out, err = vm_exec(env.vm, ["sh", "-c", script], timeout=120)
    print("\n" + out + err)
    assert time.monotonic() - t0 < 60, "calls hung"
    assert "create late.txt=0" not in out and "create HEAD=0" not in out, out
    assert "mkdir=0" not in out and "rename=0" not in out, out
    assert "host project" in out and "append=0" not in out, out
    for name in ("late.txt", "HEAD", "late-dir", "moved.md"):
        assert not (env.share / name).exists(), name
    assert (env.share / "README.md").read_text() == "host project\n"
    assert virtiofsd.alive()
