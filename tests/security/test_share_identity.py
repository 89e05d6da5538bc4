"""virtiofsd never runs as root (issue 15 item 9), host side: a root capsem serves every folder,
root-owned ones included, through an idmapped mount to a virtiofsd whose uid is leased for it
alone. Real processes, real mounts (this test runs as root); the guest side is in
test_vm_attacks.py."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from capsem_vm import idmap_share, privsep, virtiofs
from capsem_vm.config import RuntimePaths, Share
from capsem_vm.errors import VMError

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="a root capsem's set-up: needs root")
OTHER = 4321  # a non-root folder owner
STAGE = [sys.executable, "-I", idmap_share.__file__]


def _status(pid: int) -> dict:
    text = Path(f"/proc/{pid}/status").read_text()
    return dict(line.split(":\t", 1) for line in text.splitlines() if ":\t" in line)


def _in_lease_range(uid: int) -> bool:
    return privsep.HELPER_UID_BASE <= uid < privsep.HELPER_UID_BASE + privsep.HELPER_UID_COUNT


def _descendants(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            if ppid == pid:
                out += [int(entry.name), *_descendants(int(entry.name))]
    return out


@pytest.fixture
def private_folder(tmp_path):
    """A folder below pytest's root-only (0700) tmp root, like `make demo`'s and CI's shares."""
    assert tmp_path.parents[1].stat().st_mode & 0o077 == 0  # /tmp/pytest-of-root: 0700
    folder = tmp_path / "project"
    folder.mkdir()
    (folder / "data.csv").write_text("a,b\n")
    return folder


@pytest.mark.parametrize("owner", [0, OTHER])
async def test_virtiofsd_runs_as_a_leased_uid_never_root_nor_the_owner(private_folder, tmp_path, owner):
    for p in [private_folder, *private_folder.rglob("*")]:
        os.chown(p, owner, owner)
    rp = RuntimePaths(tmp_path / "vm")
    rp.root.mkdir(mode=0o700)
    leases_before = set(os.listdir(privsep.LEASE_DIR)) if privsep.LEASE_DIR.exists() else set()
    proc = await virtiofs.start_virtiofsd(Share(private_folder, "nb"), rp)
    try:
        deadline = time.monotonic() + 20  # "ready" comes just before the stage execs unshare
        while "virtiofsd" not in Path(f"/proc/{proc.pid}/cmdline").read_bytes().split(b"\0")[0].decode():
            assert proc.alive() and time.monotonic() < deadline
            await asyncio.sleep(0.05)
        pids = [proc.pid, *_descendants(proc.pid)]
        uids = set()
        for pid in pids:
            st = _status(pid)
            uids |= set(st["Uid"].split()) | set(st["Gid"].split())
            assert st["Groups"].strip() == "", st
            assert os.readlink(f"/proc/{pid}/ns/user") != os.readlink("/proc/self/ns/user")
            assert st["Seccomp"].strip() == "2" and st["NoNewPrivs"].strip() == "1"
        assert len(uids) == 1, uids
        leased = int(uids.pop())
        assert _in_lease_range(leased) and leased not in (0, owner)
        assert str(leased) in set(os.listdir(privsep.LEASE_DIR)) - leases_before  # a lease of its own
        # `ps` still tells which folder it serves, through the neutral mount point
        cmdline = Path(f"/proc/{proc.pid}/cmdline").read_bytes().decode()
        assert f"source={virtiofs.SHARE_MOUNT_BASE}{private_folder}" in cmdline
        assert list(virtiofs.SHARE_MOUNT_BASE.iterdir()) == []  # the mount is in virtiofsd's namespace only
    finally:
        await proc.stop(grace=2)
    assert str(leased) not in os.listdir(privsep.LEASE_DIR)  # released with the process


def _stage(folder: Path, owner: int, leased: int, script: str, rdonly: bool = False,
           base: Path | None = None) -> tuple[str, subprocess.CompletedProcess]:
    base = base or virtiofs.share_mount_base()
    r, w = os.pipe()
    try:
        out = subprocess.run(STAGE + [str(folder), str(base), str(owner), str(owner), str(leased), str(w),
                                      "1" if rdonly else "0", "--", "sh", "-c", script, "sh",
                                      idmap_share.target_for(str(base), str(folder))],
                             pass_fds=(w,), capture_output=True, text=True, timeout=60)
        os.close(w)
        w = -1
        return os.read(r, 4096).decode(), out
    finally:
        os.close(r)
        if w >= 0:
            os.close(w)


WRITER = ('id -u; id -G; grep CapEff /proc/self/status; echo new > "$1/new.txt"; mkdir "$1/dir"; '
          'echo in > "$1/dir/f"; echo more >> "$1/data.csv"; echo x > "$1/others.txt" 2>/dev/null && echo WROTE-OTHERS; '
          'stat -c "%u" "$1/others.txt"; true')


@pytest.mark.parametrize("owner", [0, OTHER])
def test_what_the_leased_uid_creates_belongs_to_the_folders_owner(private_folder, owner):
    (private_folder / "others.txt").write_text("not the owner's\n")
    os.chown(private_folder / "others.txt", 777, 777)
    os.chmod(private_folder / "others.txt", 0o644)
    for p in [private_folder, private_folder / "data.csv"]:
        os.chown(p, owner, owner)
    leased = privsep.HELPER_UID_BASE + 4343
    ready, out = _stage(private_folder, owner, leased, WRITER)
    assert ready == "ok\n" and out.returncode == 0, (ready, out.stderr)
    lines = out.stdout.split()
    assert lines[:2] == [str(leased), str(leased)]  # uid; no groups but its own gid
    assert lines[2:4] == ["CapEff:", "0000000000000000"]
    assert "WROTE-OTHERS" not in out.stdout and lines[-1] == "65534"  # another owner's file: unmapped, untouchable
    for p in ("new.txt", "dir", "dir/f", "data.csv"):
        st = (private_folder / p).stat()
        assert (st.st_uid, st.st_gid) == (owner, owner), p
    assert (private_folder / "data.csv").read_text() == "a,b\nmore\n"
    assert (private_folder / "others.txt").read_text() == "not the owner's\n"


def test_a_read_only_share_is_a_read_only_idmapped_mount(private_folder):
    ready, out = _stage(private_folder, 0, privsep.HELPER_UID_BASE + 4344,
                        'cat "$1/data.csv"; echo x > "$1/new" || echo REFUSED', rdonly=True)
    assert ready == "ok\n" and "a,b" in out.stdout and "REFUSED" in out.stdout
    assert not (private_folder / "new").exists()


def test_the_stage_refuses_a_folder_swapped_or_a_mount_point_others_can_write(private_folder, tmp_path):
    leased = privsep.HELPER_UID_BASE + 4345
    link = tmp_path / "link"
    link.symlink_to("/etc")  # what capsem checked was `link`'s old target; now it leads elsewhere
    ready, out = _stage(link, 0, leased, "echo RAN")
    assert ready.startswith("error:") and "RAN" not in out.stdout and out.returncode != 0
    ready, out = _stage(private_folder, OTHER, leased, "echo RAN")  # owner changed since the check
    assert ready.startswith("error:") and "changed since it was checked" in ready and "RAN" not in out.stdout
    open_base = tmp_path / "base"
    open_base.mkdir(mode=0o777)
    os.chmod(open_base, 0o777)
    ready, out = _stage(private_folder, 0, leased, "echo RAN", base=open_base)
    assert "writable by root only" in ready and "RAN" not in out.stdout
    ready, out = _stage(private_folder, 0, 0, "echo RAN")
    assert "must not be 0" in ready and "RAN" not in out.stdout


def test_a_mount_point_others_can_write_is_refused_clearly(tmp_path, monkeypatch):
    base = tmp_path / "base"
    base.mkdir()
    os.chmod(base, 0o757)
    monkeypatch.setattr(virtiofs, "SHARE_MOUNT_BASE", base)
    with pytest.raises(VMError, match="writable by root only"):
        virtiofs.share_mount_base()


def test_the_stage_still_dies_with_its_owner(private_folder):
    """Dropping to the leased uid clears the parent-death signal: the stage re-arms it."""
    script = (
        "import asyncio, os\n"
        "from capsem_vm.process import spawn\n"
        "async def main():\n"
        "    r, w = os.pipe()\n"
        f"    argv = {STAGE!r} + [{str(private_folder)!r}, {str(virtiofs.share_mount_base())!r}, '0', '0', "
        f"'{privsep.HELPER_UID_BASE + 4346}', str(w), '0', '--', 'sleep', '600']\n"
        "    p = await spawn('stage', argv, pass_fds=(w,))\n"
        "    os.close(w)\n"
        "    assert os.read(r, 10) == b'ok\\n'\n"
        "    print(p.pid, flush=True)\n"
        "    await asyncio.sleep(600)\n"
        "asyncio.run(main())\n")
    owner = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE)
    child = int(owner.stdout.readline())
    assert _status(child)["Uid"].split()[0] == str(privsep.HELPER_UID_BASE + 4346)
    owner.kill()
    owner.wait()
    deadline = time.monotonic() + 10
    while Path(f"/proc/{child}").exists() and "Z" not in _status(child).get("State", "Z"):
        assert time.monotonic() < deadline, "virtiofsd's stage outlived its owner"
        time.sleep(0.05)


@pytest.mark.parametrize("parent", ["Head", "HEAD", "head"])
async def test_a_folder_below_a_directory_named_like_head_can_be_shared(tmp_path, parent):
    """The idmap stage runs under the share guard's filter and mirrors the folder's host path on its
    tmpfs: before, its mkdir of `.../Head` was refused as a repository name (EPERM), so a root
    capsem could not share any folder below a directory named head/HEAD in any case. The guard is
    armed once the stage is done (the guest cannot reach virtiofsd before)."""
    folder = tmp_path / parent / "project"
    folder.mkdir(parents=True)
    rp = RuntimePaths(tmp_path / "vm")
    rp.root.mkdir(mode=0o700)
    proc = await virtiofs.start_virtiofsd(Share(folder, "nb"), rp)
    try:
        assert proc.alive() and proc.guard.armed
    finally:
        await proc.stop(grace=2)


@pytest.mark.parametrize("inside", [".git/hooks", ".git/info", "bare.git/hooks", ".hg/store"])
def test_a_folder_inside_a_repositorys_own_directory_is_not_shared_writable(tmp_path, inside):
    """The share guard judges paths from the share's root down: sharing repo/.git/hooks writable
    would let the guest write the hooks host git runs. Refused (read-only is fine)."""
    repo = tmp_path / "repo"
    (repo / ".git").mkdir(parents=True)
    (repo / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (repo / "bare.git").mkdir()
    (repo / "bare.git" / "HEAD").write_text("ref: refs/heads/main\n")
    folder = repo / inside
    folder.mkdir(parents=True)
    with pytest.raises(VMError, match="inside .*repository's own directory"):
        virtiofs.protected_paths(folder)
    (repo / "notebooks").mkdir(exist_ok=True)
    assert virtiofs.protected_paths(repo / "notebooks") == []  # a work tree's subfolder is fine
