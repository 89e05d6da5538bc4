"""The share guard on a real child process (not virtiofsd): its seccomp filter sends every call
that creates a name to the supervisor, which refuses repository names (`.git`, `HEAD`, `.hg`, any
spelling, at any depth, by every call that can make a name) and renames of symlinks; hard links
are refused outright. Both ways the filter is installed (in spawn's preexec, or by `python -I
seccomp.py --listener-to FD` where capsem runs as a normal user with groups) are checked, and so is
what happens when the supervisor dies: the calls fail, they neither hang nor succeed."""

from __future__ import annotations

import asyncio
import json
import os
import string
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings, strategies as st

from capsem_vm import repo_names
from capsem_vm.process import spawn
from capsem_vm.share_guard import ShareGuard

import guest_scripts as gs

REPO_SPELLINGS = [".git", ".GIT", ".Git", ".git.", ".git ", ".git. .", ".g\u200cit", "\ufeff.git", "\uff0egit",
                  "git~1", "GIT~1", ".git::$INDEX_ALLOCATION", "HEAD", "head", "Head", "HEAD.", "HEAD ",
                  "H\u200dEAD", ".hg", ".HG"]
ORDINARY = ["notes.txt", ".gitignore", ".github", ".gitattributes", "heads", "HEADER", "git", "head.txt",
            "my.git", ".hgignore", "HEAD~", "data"]

# argv: dir. Tries every way to give something in dir (and at depth a/b/c) a name; prints results.
PROBE = gs.TRY + gs.SYSCALL + r"""
import ctypes, errno, json, os, sys
d = sys.argv[1]
names = json.loads(sys.argv[2])
ordinary = json.loads(sys.argv[3])
j = lambda *p: os.path.join(d, *p).encode()
os.chdir(d)  # rename sources are single names, as virtiofsd gives them (see share_guard.py)
src_n = [0]
def src():
    src_n[0] += 1
    p = f"src{src_n[0]}"
    open(p, "w").close()
    return p
deep = os.path.join(d, "a", "b", "c")
t("mkdir deep", lambda: os.makedirs(deep))
dfd = os.open(deep, os.O_RDONLY | os.O_DIRECTORY)
AT_FDCWD, O_CW = -100, os.O_CREAT | os.O_WRONLY
for base, where in ((d, "top"), (deep, "deep")):
    bfd = os.open(base, os.O_RDONLY | os.O_DIRECTORY)
    for n in names + ordinary:
        p = os.path.join(base, n).encode()
        b = n.encode()
        k = f"{where} {n!r}"
        def clean():
            try:
                os.rmdir(p) if os.path.isdir(p) else os.unlink(p)
            except FileNotFoundError:
                pass
        def rename_dir():
            name = src() + ".d"
            os.mkdir(name)
            os.rename(name, p)
        def empty_path_link():
            fd = os.open(src(), os.O_RDONLY)
            sc(265, fd, b"", bfd, b, 0x1000)  # linkat AT_EMPTY_PATH
        for call, f in [
                ("open", lambda: os.close(os.open(p, O_CW, 0o644))),
                ("openat", lambda: os.close(os.open(b, O_CW, 0o644, dir_fd=bfd))),
                ("open(2)", lambda: os.close(sc(2, p, O_CW, 0o644))),
                ("creat", lambda: os.close(sc(85, p, 0o644))),
                ("mkdir", lambda: os.mkdir(p)),
                ("mkdirat", lambda: os.mkdir(b, dir_fd=bfd)),
                ("mkdir(2)", lambda: sc(83, p, 0o755)),
                ("rename", lambda: os.rename(src(), p)),
                ("rename(2)", lambda: sc(82, src().encode(), p)),
                ("renameat", lambda: sc(264, AT_FDCWD, src().encode(), bfd, b)),
                ("renameat2", lambda: sc(316, AT_FDCWD, src().encode(), bfd, b, 0)),
                ("renameat2 noreplace", lambda: sc(316, AT_FDCWD, src().encode(), bfd, b, 1)),
                ("rename dir", rename_dir),
                ("mknod", lambda: os.mknod(p, 0o644 | 0o100000)),
                ("link", lambda: os.link(src(), p)),
                ("linkat AT_EMPTY_PATH", empty_path_link)]:
            t(f"{call} {k}", f)
            clean()
    os.close(bfd)
def unix_socket():
    import socket
    socket.socket(socket.AF_UNIX).bind(os.path.join(d, "sock"))
t("bind a unix socket", unix_socket)
# renameat2 flags the filter refuses whatever the names
open(j("x1"), "w").close(); open(j("x2"), "w").close()
t("renameat2 exchange", lambda: sc(316, AT_FDCWD, j("x1"), AT_FDCWD, j("x2"), 2))
t("renameat2 whiteout", lambda: sc(316, AT_FDCWD, j("x1"), AT_FDCWD, j("x3"), 4))
# the host user's symlink: no hard link to it, no rename of it, no exchange with it
t("hard link to host symlink", lambda: os.link(j("host-link"), j("analysis.ipynb"), follow_symlinks=False))
t("rename host symlink", lambda: os.rename("host-link", j("analysis.ipynb")))
t("rename host symlink by path", lambda: os.rename(j("host-link"), j("analysis.ipynb")))
t("renameat host symlink", lambda: sc(264, os.open(d, os.O_RDONLY), b"host-link", AT_FDCWD, j("analysis.ipynb")))
t("renameat2 noreplace host symlink", lambda: sc(316, AT_FDCWD, b"host-link", AT_FDCWD, j("analysis.ipynb"), 1))
t("exchange with host symlink", lambda: sc(316, AT_FDCWD, j("x1"), AT_FDCWD, j("host-link"), 2))
t("file onto host symlink", lambda: os.rename("x1", j("host-link")))
links = []
for fd in os.listdir("/proc/self/fd"):
    try:
        links.append(os.readlink(f"/proc/self/fd/{fd}"))
    except OSError:
        pass
res["listener fds"] = [link for link in links if "seccomp" in link]
print(json.dumps(res))
"""

# argv: dir. Waits for a line on stdin, then tries to create names (after the guard is gone).
AFTER = gs.TRY + r"""
import errno, json, os, sys
d = sys.argv[1]
sys.stdin.readline()
t("create", lambda: os.close(os.open(os.path.join(d, "late.txt"), os.O_CREAT | os.O_WRONLY)))
t("create .git", lambda: os.close(os.open(os.path.join(d, ".git"), os.O_CREAT | os.O_WRONLY)))
t("mkdir", lambda: os.mkdir(os.path.join(d, "late")))
t("rename", lambda: os.rename(os.path.join(d, "existing"), os.path.join(d, "moved")))
t("write existing", lambda: os.close(os.open(os.path.join(d, "existing"), os.O_WRONLY | os.O_APPEND)))
print(json.dumps(res), flush=True)
"""


async def _guarded(argv: list[str], how: str, **kw):
    guard = ShareGuard("test")
    if how == "script":
        proc = await spawn("probe", guard.wrap(argv), pass_fds=guard.pass_fds, **kw)
    else:
        proc = await spawn("probe", argv, seccomp=guard.filter, **kw)
    await guard.attach(proc)
    return guard, proc


async def _communicate(proc, data: bytes | None = None, timeout: float = 120):
    return await asyncio.wait_for(asyncio.to_thread(proc.popen.communicate, data), timeout)


@pytest.mark.parametrize("how", ["preexec", "script"])
async def test_every_way_to_make_a_repository_name_is_refused(tmp_path, how):
    (tmp_path / "host-link").symlink_to("/etc/hostname")
    guard, proc = await _guarded([sys.executable, "-c", PROBE, str(tmp_path), json.dumps(REPO_SPELLINGS),
                                  json.dumps(ORDINARY)], how, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = await _communicate(proc)
    await proc.wait()
    res = json.loads(out)
    assert res.pop("listener fds") == [], "the seccomp listener stayed open in the confined program"
    assert res.pop("mkdir deep") == "ok"
    wrong = {}
    for key, got in res.items():
        if any(f" {n!r}" in key and key.endswith(f" {n!r}") for n in REPO_SPELLINGS):
            want = {"EPERM"}
        elif key.startswith(("mknod ", "link ", "linkat ")):
            want = {"EPERM"}  # refused outright, whatever the name
        elif any(key.endswith(f" {n!r}") for n in ORDINARY):
            want = {"ok"}
        else:
            want = {"renameat2 exchange": {"EPERM"}, "bind a unix socket": {"EPERM"}, "renameat2 whiteout": {"EPERM"},
                    "hard link to host symlink": {"EPERM"}, "rename host symlink": {"EPERM"},
                    "renameat host symlink": {"EPERM"}, "rename host symlink by path": {"EPERM"}, "renameat2 noreplace host symlink": {"EPERM"},
                    "exchange with host symlink": {"EPERM"}, "file onto host symlink": {"ok"}}[key]
        if got not in want:
            wrong[key] = got
    assert wrong == {}, (wrong, err.decode()[-2000:])
    # nothing with a repository's name exists anywhere, and the host's symlink was never moved
    planted = [p for p in tmp_path.rglob("*") if repo_names.repository_name(p.name)]
    assert planted == []
    assert not (tmp_path / "analysis.ipynb").is_symlink()
    assert guard.refused > 0 and guard.allowed > 0
    await asyncio.to_thread(guard._thread.join, 10)
    assert not guard.alive(), "the guard outlived the program it guarded"


@pytest.mark.parametrize("how", ["preexec", "script"])
async def test_a_dead_guard_makes_name_creating_calls_fail(tmp_path, how):
    (tmp_path / "existing").write_text("x")
    guard, proc = await _guarded([sys.executable, "-c", AFTER, str(tmp_path)], how,
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    guard.close()  # what the kernel sees when the supervisor dies: its listener fd is closed
    assert not guard.alive()
    out, err = await _communicate(proc, b"go\n", timeout=60)
    await proc.wait()
    res = json.loads(out)
    assert res == {"create": "ENOSYS", "create .git": "ENOSYS", "mkdir": "ENOSYS", "rename": "ENOSYS",
                   "write existing": "ENOSYS"}, err  # writes are checked too: they fail closed as well
    assert sorted(p.name for p in tmp_path.iterdir()) == ["existing"]


async def test_calls_pending_when_the_guard_dies_fail_instead_of_hanging(tmp_path):
    """The listener is sent but never served: calls wait in the kernel. Dropping it fails them."""
    guard = ShareGuard("test")
    proc = await spawn("probe", [sys.executable, "-c", AFTER, str(tmp_path)], seccomp=guard.filter,
                       stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    (tmp_path / "existing").write_text("x")
    proc.popen.stdin.write(b"go\n")
    proc.popen.stdin.flush()
    await asyncio.sleep(1.0)
    assert proc.alive() and "State:\tS" in Path(f"/proc/{proc.pid}/status").read_text()
    guard.close()  # the listener, still in flight in our socket, is closed with it
    out, err = await _communicate(proc, None, timeout=30)
    res = json.loads(out)
    assert res["create"] == "ENOSYS" and res["create .git"] == "ENOSYS", (res, err)
    assert not (tmp_path / ".git").exists() and not (tmp_path / "late.txt").exists()


# argv: none. Opens files of its own proc task dir for writing, relative to a dirfd (as virtiofsd does).
PROC_WRITES = gs.TRY + r"""
import json, os, threading
task = os.open("/proc/self/task", os.O_RDONLY | os.O_DIRECTORY)
tid = threading.get_native_id()
for name in (f"{tid}/attr/fscreate", f"{tid}/comm", f"{tid}/attr/fscreate/../../comm"):
    t(name.replace(str(tid), "TID"), lambda: os.close(os.open(name, os.O_WRONLY, dir_fd=task)))
print(json.dumps(res))
"""


async def test_virtiofsds_fscreate_probe_is_refused_quietly_other_proc_writes_loudly(caplog):
    """virtiofsd's start-up SELinux probe (its thread's attr/fscreate) is refused like every write
    into proc, without the warning each VM start used to log; any other write into proc is still
    refused and warned about (also a spelling that only starts like the probe)."""
    caplog.set_level("DEBUG", logger="capsem_vm.share_guard")
    guard, proc = await _guarded([sys.executable, "-c", PROC_WRITES], "preexec",
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = await _communicate(proc, timeout=60)
    await proc.wait()
    guard.close()
    assert json.loads(out) == {"TID/attr/fscreate": "EPERM", "TID/comm": "EPERM",
                               "TID/attr/fscreate/../../comm": "EPERM"}, err
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warned and not any("fscreate'" in w for w in warned), warned
    assert guard.refused == 2  # the probe is not counted with the refusals worth reporting


async def test_a_child_that_never_sends_its_listener_is_not_trusted(tmp_path):
    guard = ShareGuard("test")
    proc = await spawn("probe", ["sleep", "30"])  # no filter: nothing arrives
    with pytest.raises(OSError, match="seccomp listener"):
        await guard.attach(proc, timeout=0.5)
    proc.kill_now()


# argv: dir. Writes into repositories the host made (after the guard started): every way in.
INTO = gs.TRY + gs.SYSCALL + r"""
import ctypes, errno, json, os, sys
d = sys.argv[1]
sys.stdin.readline()  # the host makes its repositories first
os.chdir(d)
W = os.O_WRONLY | os.O_APPEND
def reopen(path, flags):  # as virtiofsd does: an O_PATH fd, reopened through /proc/self/fd
    fd = os.open(path, os.O_PATH)
    proc = os.open("/proc/self/fd", os.O_RDONLY | os.O_DIRECTORY)
    os.close(os.open(str(fd), flags, dir_fd=proc))
open("plain.txt", "w").close()
open("moveme", "w").close()
for repo in ("proj/.git", "bare.git", "nested/lib/.GIT"):
    t(f"append {repo}/config", lambda: os.close(os.open(f"{repo}/config", W)))
    t(f"truncate open {repo}/config", lambda: os.close(os.open(f"{repo}/config", os.O_WRONLY | os.O_TRUNC)))
    t(f"truncate(2) {repo}/config", lambda: sc(76, f"{repo}/config".encode(), 0))
    t(f"reopen {repo}/config", lambda: reopen(f"{repo}/config", os.O_RDWR))
    t(f"new hook in {repo}", lambda: os.close(os.open(f"{repo}/hooks/post-checkout", os.O_CREAT | os.O_WRONLY)))
    t(f"mkdir in {repo}", lambda: os.mkdir(f"{repo}/info"))
    t(f"rename into {repo}", lambda: os.rename("moveme", f"{repo}/hooks/pre-commit"))
    t(f"read {repo}/config", lambda: os.close(os.open(f"{repo}/config", os.O_RDONLY)))
t("write the gitdir file wt/.git", lambda: os.close(os.open("wt/.git", W)))
t("reopen wt/.git", lambda: reopen("wt/.git", os.O_WRONLY))
t("write plain", lambda: os.close(os.open("plain.txt", W)))
t("reopen plain", lambda: reopen("plain.txt", os.O_RDWR))
t("create plain", lambda: os.close(os.open("proj/new.txt", os.O_CREAT | os.O_WRONLY)))
print(json.dumps(res))
"""


@pytest.mark.parametrize("how", ["preexec", "script"])
async def test_repositories_the_host_makes_later_cannot_be_written(tmp_path, how):
    """Repositories found at start are read-only mounts; one the host user makes while the VM runs
    (a clone, `git init`) is protected by the guard: nothing is created or written inside it."""
    guard, proc = await _guarded([sys.executable, "-c", INTO, str(tmp_path)], how,
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    for repo in (tmp_path / "proj" / ".git", tmp_path / "bare.git", tmp_path / "nested" / "lib" / ".GIT"):
        (repo / "hooks").mkdir(parents=True)  # made by the host, after the guard started
        (repo / "config").write_text("[core]\n")
    (tmp_path / "bare.git" / "HEAD").write_text("ref: refs/heads/main\n")
    (tmp_path / "wt").mkdir()
    (tmp_path / "wt" / ".git").write_text("gitdir: ../proj/.git\n")
    out, err = await _communicate(proc, b"")
    res = json.loads(out)
    ok = {"write plain", "reopen plain", "create plain"} | {k for k in res if k.startswith("read ")}
    assert {k: v for k, v in res.items() if (v == "ok") != (k in ok)} == {}, err
    for repo in (tmp_path / "proj" / ".git", tmp_path / "bare.git", tmp_path / "nested" / "lib" / ".GIT"):
        assert (repo / "config").read_text() == "[core]\n" and list((repo / "hooks").iterdir()) == []
    assert (tmp_path / "wt" / ".git").read_text() == "gitdir: ../proj/.git\n"


@settings(max_examples=300, deadline=None)
@given(base=st.sampled_from([".git", "head", ".hg", "git~1"]),
       flips=st.lists(st.booleans(), min_size=8, max_size=8),
       joiners=st.lists(st.tuples(st.integers(0, 6), st.sampled_from(["\u200c", "\u200d", "\u200e", "\u200f",
                                                                      "\u202a", "\u206a", "\ufeff", "\u2060"])),
                        max_size=3),
       tail=st.text(alphabet=". ", max_size=4), stream=st.sampled_from(["", ":", "::$INDEX_ALLOCATION", ":x"]))
def test_every_spelling_of_a_repository_name_is_recognised(base, flips, joiners, tail, stream):
    name = "".join(c.upper() if f else c for c, f in zip(base, flips + [False] * len(base)))
    for pos, ch in joiners:
        name = name[:pos] + ch + name[pos:]
    name = name + tail + stream
    assert repo_names.repository_name(name) is not None
    assert repo_names.repository_name(name.encode()) is not None


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=string.ascii_letters + string.digits + "._-~ ", min_size=1, max_size=12))
def test_other_ascii_names_are_allowed(name):
    if name.lower().rstrip(". ") in (".git", "head", ".hg", "git~1"):
        return
    assert repo_names.repository_name(name) is None


def test_existing_repositories_at_any_depth_are_found(tmp_path):
    (tmp_path / ".git" / "objects").mkdir(parents=True)
    (tmp_path / "proj" / "lib" / ".git").mkdir(parents=True)
    (tmp_path / "proj" / "lib" / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (tmp_path / "wt").mkdir()
    (tmp_path / "wt" / ".git").write_text("gitdir: ../.git/worktrees/wt\n")
    (tmp_path / "bare.git" / "refs").mkdir(parents=True)
    (tmp_path / "bare.git" / "HEAD").write_text("ref: refs/heads/main\n")
    (tmp_path / "lonely").mkdir()
    (tmp_path / "lonely" / "Head").write_text("not a repo yet\n")
    (tmp_path / "m" / ".hg").mkdir(parents=True)
    (tmp_path / "plain" / "sub").mkdir(parents=True)
    (tmp_path / "plain" / ".gitignore").write_text("x")
    (tmp_path / "plain" / ".git-link").symlink_to("/etc")
    found = [p.relative_to(tmp_path) for p in repo_names.existing_repositories(tmp_path)]
    assert sorted(map(str, found)) == [".git", "bare.git", "lonely", "m/.hg", "proj/lib/.git", "wt/.git"]
    with pytest.raises(repo_names.TooManyDirectories):
        repo_names.existing_repositories(tmp_path, max_dirs=3)


def test_a_writable_share_that_is_a_git_directory_or_too_big_is_refused(tmp_path, monkeypatch):
    from capsem_vm import virtiofs
    from capsem_vm.errors import VMError
    (tmp_path / "sub" / ".git").mkdir(parents=True)
    assert virtiofs.protected_paths(tmp_path) == [tmp_path / "sub" / ".git"]
    monkeypatch.setattr(repo_names.existing_repositories, "__defaults__", (1,))  # max_dirs
    with pytest.raises(VMError, match="too many"):
        virtiofs.protected_paths(tmp_path)
    monkeypatch.undo()
    (tmp_path / "head").write_text("ref: refs/heads/main\n")
    with pytest.raises(VMError, match="HEAD"):
        virtiofs.protected_paths(tmp_path)
