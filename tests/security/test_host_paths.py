"""Host paths capsem creates, changes or trusts (issue 15 item 12 a-c): the runtime dir is never a
name in /tmp anybody could create first, and whatever dir is used is checked; no chmod/chown
follows a symlink; a root capsem boots only images root alone can change. Real files, real
processes as other uids (this test runs as root where it switches users)."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import stat
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

import pytest

from capsem_vm import nofollow, paths, privsep
from capsem_vm.errors import CapsemError, ImageError
from capsem_vm.image import trust
from capsem_vm.process import Identity
from capsem_vm.vsock.base import VsockTransport

REPO = Path(__file__).resolve().parents[2]
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="acts as other users: needs root")
USER = privsep.HELPER_UID_BASE + 4350  # a normal user with no account (no home, no /run/user dir)
ATTACKER = privsep.HELPER_UID_BASE + 4351


@pytest.fixture
def home():
    """A home directory for USER, reachable by it (pytest's tmp root is root-only)."""
    base = Path(tempfile.mkdtemp(prefix="capsem-home-"))
    os.chmod(base, 0o755)
    h = base / "home"
    h.mkdir()
    os.chown(h, USER, USER)
    yield h
    shutil.rmtree(base)


def _runtime_dir_as_user(home: Path, **env) -> dict:
    script = ("import json, os\nfrom capsem_vm import paths\n"
              "try:\n    print(json.dumps({'dir': str(paths.runtime_dir())}))\n"
              "except Exception as e:\n    print(json.dumps({'error': type(e).__name__, 'msg': str(e)}))\n")
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("CAPSEM_", "XDG_"))}
    # the venv's interpreter may be out of this user's reach (a pyenv Python under /root): the
    # system's Python of the same version with the venv's packages
    purelib = sysconfig.get_paths()["purelib"]
    clean.update(HOME=str(home), PYTHONPATH=f"{os.environ.get('PYTHONPATH', str(REPO))}:{purelib}", **env)
    python = f"/usr/bin/python{sys.version_info[0]}.{sys.version_info[1]}"
    out = subprocess.run([python, "-c", script], user=USER, group=USER, extra_groups=[], env=clean,
                         capture_output=True, text=True, timeout=60, cwd="/")
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


# --- (a) the runtime dir -----------------------------------------------------------------------

@needs_root
def test_runtime_dir_fallback_is_not_a_name_in_tmp_an_attacker_can_take(home):
    """No XDG_RUNTIME_DIR, no /run/user/UID: the fallback is in the user's own data dir. On main it
    was /tmp/capsem-UID: an attacker who made it first owned the user's VM sockets or blocked them."""
    planted = Path(f"/tmp/capsem-{USER}")
    planted.mkdir(mode=0o777, exist_ok=True)
    os.chown(planted, ATTACKER, ATTACKER)
    try:
        res = _runtime_dir_as_user(home)
        assert "dir" in res, res
        d = Path(res["dir"])
        assert d == home / ".local" / "share" / "capsem" / "run"
        st = d.lstat()
        assert st.st_uid == USER and stat.S_IMODE(st.st_mode) == 0o700
        assert list(planted.iterdir()) == []
    finally:
        shutil.rmtree(planted)


@needs_root
def test_runtime_dir_uses_run_user_when_it_is_the_users_own(home):
    run_user = Path(f"/run/user/{USER}")
    run_user.mkdir(mode=0o700, parents=True)
    try:
        os.chown(run_user, USER, USER)
        assert _runtime_dir_as_user(home) == {"dir": f"{run_user}/capsem"}
        os.chown(run_user, ATTACKER, ATTACKER)  # someone else's: not used
        assert _runtime_dir_as_user(home)["dir"].startswith(str(home))
        # an XDG_RUNTIME_DIR that is not the user's own private dir is not used either
        assert _runtime_dir_as_user(home, XDG_RUNTIME_DIR=str(run_user))["dir"].startswith(str(home))
    finally:
        shutil.rmtree(run_user)


@needs_root
@pytest.mark.parametrize("plant", ["owned by another user", "world-writable", "group-writable",
                                   "symlink to own dir", "in a world-writable non-sticky dir"])
def test_a_runtime_dir_someone_else_could_control_is_refused(home, plant):
    base = home.parent
    target = base / "rt"
    if plant == "owned by another user":
        target.mkdir(mode=0o700)
        os.chown(target, ATTACKER, ATTACKER)
    elif plant in ("world-writable", "group-writable"):
        target.mkdir()
        os.chmod(target, 0o777 if plant == "world-writable" else 0o770)
        os.chown(target, USER, USER)
    elif plant == "symlink to own dir":
        own = home / "mine"
        own.mkdir(mode=0o700)
        os.chown(own, USER, USER)
        target.symlink_to(own)
    else:
        open_dir = base / "open"
        open_dir.mkdir()
        os.chmod(open_dir, 0o777)
        target = open_dir / "rt"
        target.mkdir(mode=0o700)
        os.chown(target, USER, USER)
    res = _runtime_dir_as_user(home, CAPSEM_RUNTIME_DIR=str(target))
    assert res.get("error") == "UnsafePathError", res
    assert str(target) in res["msg"]


def test_private_dir_makes_a_fresh_dir_0700(tmp_path):
    d = nofollow.private_dir(tmp_path / "a" / "b")
    assert stat.S_IMODE(d.stat().st_mode) == 0o700


# --- (b) no chmod/chown follows a symlink ------------------------------------------------------

MODE_CHANGES = re.compile(r"\bos\.(chmod|chown|lchown)\(|\.chmod\(|shutil\.chown\(")


def test_no_mode_or_owner_change_in_capsem_goes_by_path_but_through_nofollow():
    """Every chmod/chown in capsem_vm and capsem_kernel goes through nofollow.py (or an fd)."""
    offenders = []
    for pkg in ("capsem_vm", "capsem_kernel"):
        for f in sorted((REPO / pkg).rglob("*.py")):
            if f.name == "nofollow.py":
                continue
            for n, line in enumerate(f.read_text().splitlines(), 1):
                if MODE_CHANGES.search(line.split("#", 1)[0]) and "nofollow." not in line:
                    offenders.append(f"{f.relative_to(REPO)}:{n}: {line.strip()}")
    assert offenders == []


@pytest.mark.parametrize("change", ["chmod", "chown"])
def test_nofollow_changes_never_reach_a_symlinks_target(tmp_path, change):
    victim = tmp_path / "victim"
    victim.write_text("precious")
    os.chmod(victim, 0o644)
    before = victim.stat()
    link = tmp_path / "link"
    link.symlink_to(victim)
    with pytest.raises(nofollow.UnsafePathError, match="symbolic link"):
        nofollow.chmod(link, 0o777) if change == "chmod" else nofollow.chown(link, 4242, 4242)
    after = victim.stat()
    assert (after.st_mode, after.st_uid, after.st_gid) == (before.st_mode, before.st_uid, before.st_gid)
    # a real file, dir and socket are changed
    sock_path = tmp_path / "s"
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(sock_path))
    for p in (victim, tmp_path / "d", sock_path):
        p.mkdir() if p.name == "d" else None
        if change == "chmod":
            nofollow.chmod(p, 0o600)
            assert stat.S_IMODE(p.lstat().st_mode) == 0o600
        elif os.geteuid() == 0:
            nofollow.chown(p, 4242, 4243)
            assert (p.lstat().st_uid, p.lstat().st_gid) == (4242, 4243)
    s.close()


class _Transport(VsockTransport):  # only the socket-ownership helper is exercised
    async def start(self): ...
    def qemu_args(self): return []
    async def listen(self, port, handler): ...
    async def connect(self, port): ...


@needs_root
def test_a_helper_swapping_its_socket_for_a_link_cannot_make_root_chmod_or_chown_the_target(tmp_path):
    """The VM dir belongs to the helper uid: a subverted QEMU can put a symlink where root is about
    to set a socket's mode and owner (on main, os.chmod followed it: /etc/shadow-like file 0600 ->
    mode changed)."""
    victim = tmp_path / "shadow"
    victim.write_text("root:x:...")
    os.chmod(victim, 0o640)
    link = tmp_path / "v.sock"
    link.symlink_to(victim)
    t = _Transport.__new__(_Transport)
    t.identity = Identity(USER, USER)
    with pytest.raises(CapsemError):
        t._own_socket(link)
    st = victim.stat()
    assert stat.S_IMODE(st.st_mode) == 0o640 and st.st_uid == 0


# --- (c) a root capsem boots only images root alone can change ---------------------------------

def _image(tmp_path: Path) -> Path:
    d = tmp_path / "images" / "img"
    d.mkdir(parents=True)
    for name in ("vmlinuz", "initrd.img", "rootfs.erofs", "manifest.json"):
        (d / name).write_bytes(b"x")
        os.chmod(d / name, 0o644)
    for p in (d, d.parent, tmp_path):
        os.chmod(p, 0o755)
    return d


@needs_root
@pytest.mark.parametrize("weak", ["image dir 0777", "image dir 0775", "image dir owned by a user", "asset 0666",
                                  "asset 0664", "asset owned by a user", "parent 0777 (not sticky)",
                                  "parent owned by a user"])
def test_an_image_others_could_change_after_verification_is_refused(tmp_path, weak):
    d = _image(tmp_path)
    target = {"image dir": d, "asset": d / "rootfs.erofs", "parent": d.parent}[weak.split(" 0")[0].split(" owned")[0]]
    if "owned by a user" in weak:
        os.chown(target, USER, USER)
    else:
        os.chmod(target, int(weak.rsplit(" ", 1)[-1] if "sticky" not in weak else "0777", 8))
    with pytest.raises(ImageError, match=re.escape(str(d))) as err:
        trust.check_root_only(d)
    assert "refusing image" in err.value.message and ("mode" in err.value.message)
    with open(d / "rootfs.erofs", "rb") as f:  # checked through the fds QEMU reads, too
        if "asset" in weak:
            with pytest.raises(ImageError, match="rootfs"):
                trust.check_root_only(d, {"rootfs": f})


@needs_root
def test_a_root_only_image_below_a_sticky_tmp_is_accepted(tmp_path):
    d = _image(tmp_path)
    os.chmod(d.parent, 0o1777)  # like /tmp: others may add entries, not replace ours
    trust.check_root_only(d)
    with open(d / "rootfs.erofs", "rb") as f:
        trust.check_root_only(d, {"rootfs": f})


@needs_root
@pytest.mark.vm  # needs the image: hard-links the stored one
def test_capsem_vm_run_as_root_refuses_a_world_writable_image(tmp_path):
    """The real command: the stored image hard-linked into a world-writable directory is refused
    before anything boots, with the directory and its mode named."""
    from capsem_vm.image.store import default_image_dir
    src = default_image_dir()
    d = tmp_path / "img"
    d.mkdir()
    for p in src.iterdir():
        try:
            os.link(p, d / p.name)
        except OSError:
            shutil.copy2(p, d / p.name)
    os.chmod(d, 0o777)
    env = dict(os.environ, CAPSEM_RUNTIME_DIR=str(tmp_path / "rt"))
    out = subprocess.run([sys.executable, "-m", "capsem_vm.cli", "vm", "run", "--image", str(d), "--memory", "256",
                          "--", "true"], capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode != 0
    assert f"refusing image {d}" in out.stderr and "0777" in out.stderr, out.stderr[-2000:]
