"""Host-side hardening without a VM: the virtiofsd seccomp filter, helper identities, PDEATHSIG
across the identity switch, uid leases, the trust rules for a helper-owned runtime dir, refused
share folders, bounded helper logs and resource checks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from capsem_vm import caplog, privsep, runtime, virtiofs
from capsem_vm.config import RuntimePaths, VMConfig
from capsem_vm.errors import VMError
from capsem_vm.process import Identity, spawn, spawn_sync
from capsem_vm.seccomp import Filter, build_filter

ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(not ROOT, reason="switching identities needs root")
HELPER = privsep.HELPER_UID_BASE + 4242  # a uid in the helper range (no account has it)

PROBE = r"""
import ctypes, errno, json, os, sys
d = sys.argv[1]
res = {}
def t(name, f):
    try:
        f(); res[name] = "ok"
    except OSError as e:
        res[name] = errno.errorcode[e.errno]
open(os.path.join(d, "f"), "w").close()
t("chmod 0755", lambda: os.chmod(os.path.join(d, "f"), 0o755))
t("chmod 4755", lambda: os.chmod(os.path.join(d, "f"), 0o4755))
t("chmod 2755", lambda: os.chmod(os.path.join(d, "f"), 0o2755))
t("chmod 1755", lambda: os.chmod(os.path.join(d, "f"), 0o1755))
t("fchmod 6755", lambda: os.fchmod(os.open(os.path.join(d, "f"), os.O_RDONLY), 0o6755))
t("create 4755", lambda: os.open(os.path.join(d, "s"), os.O_CREAT | os.O_WRONLY, 0o4755))
t("create 0644", lambda: os.close(os.open(os.path.join(d, "r"), os.O_CREAT | os.O_WRONLY, 0o644)))
t("mkdir 2775", lambda: os.mkdir(os.path.join(d, "sg"), 0o2775))
t("mkdir 0755", lambda: os.mkdir(os.path.join(d, "dir"), 0o755))
t("mkfifo", lambda: os.mkfifo(os.path.join(d, "fifo")))
t("mknod char", lambda: os.mknod(os.path.join(d, "null"), 0o600 | 0o020000, os.makedev(1, 3)))
t("symlink", lambda: os.symlink("/etc/shadow", os.path.join(d, "link")))
t("hard link", lambda: os.link(os.path.join(d, "f"), os.path.join(d, "f2")))
t("setxattr", lambda: os.setxattr(os.path.join(d, "f"), "user.x", b"1"))
t("rename", lambda: os.rename(os.path.join(d, "r"), os.path.join(d, "r2")))
libc = ctypes.CDLL(None, use_errno=True)
def sc(*a):
    if libc.syscall(*a) < 0:
        raise OSError(ctypes.get_errno(), "")
t("io_uring_setup", lambda: sc(425, 8, ctypes.create_string_buffer(120)))
t("openat2", lambda: sc(437, -100, b"/etc/hostname", ctypes.create_string_buffer(24), 24))
res["mode"] = oct(os.stat(os.path.join(d, "f")).st_mode & 0o7777)
print(json.dumps(res))
"""


def test_virtiofsd_filter_refuses_setid_devices_symlinks_xattrs(tmp_path):
    proc = spawn_sync("probe", [sys.executable, "-c", PROBE, str(tmp_path)], seccomp=Filter(),
                      stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = proc.popen.communicate(timeout=60)
    res = json.loads(out)
    assert res == {
        "chmod 0755": "ok", "chmod 4755": "EPERM", "chmod 2755": "EPERM", "chmod 1755": "ok",
        "fchmod 6755": "EPERM", "create 4755": "EPERM", "create 0644": "ok", "mkdir 2775": "EPERM",
        "mkdir 0755": "ok", "mkfifo": "EPERM", "mknod char": "EPERM", "symlink": "EPERM",
        "hard link": "EPERM", "setxattr": "EPERM", "rename": "ok", "io_uring_setup": "EPERM",
        "openat2": "EPERM", "mode": "0o1755"}, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dir", "f", "r2"]


def test_filter_program_is_well_formed():
    prog = build_filter()
    assert len(prog) % 8 == 0 and 0 < len(prog) // 8 < 4096


@needs_root
async def test_helpers_run_with_the_given_identity_and_no_groups():
    proc = await spawn("id", ["sh", "-c", "cat /proc/self/status"], identity=Identity(HELPER, HELPER),
                       stdout=subprocess.PIPE)
    out = proc.popen.communicate(timeout=30)[0].decode()
    fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
    assert fields["Uid"].split() == [str(HELPER)] * 4 and fields["Gid"].split() == [str(HELPER)] * 4
    assert fields["Groups"].strip() == ""
    assert int(fields["CapEff"], 16) == 0 and int(fields["CapPrm"], 16) == 0
    await proc.wait()


@needs_root
def test_helper_with_another_identity_still_dies_with_its_owner(tmp_path):
    """PDEATHSIG is cleared by a credential change: it must be armed after the switch."""
    script = (
        "import asyncio\n"
        "from capsem_vm.process import Identity, spawn\n"
        "async def main():\n"
        f"    p = await spawn('sleeper', ['sleep', '600'], identity=Identity({HELPER}, {HELPER}))\n"
        "    print(p.pid, flush=True)\n"
        "    await asyncio.sleep(600)\n"
        "asyncio.run(main())\n")
    owner = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE)
    child = int(owner.stdout.readline())
    assert Path(f"/proc/{child}/status").read_text().count(str(HELPER)) >= 4
    owner.kill()
    owner.wait()
    deadline = time.monotonic() + 10
    while Path(f"/proc/{child}").exists() and "State:\tZ" not in _status(child):
        assert time.monotonic() < deadline, "helper outlived its owner"
        time.sleep(0.05)


def _status(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return ""


@needs_root
def test_uid_leases_are_exclusive_and_stale_ones_are_taken_over(tmp_path, monkeypatch):
    monkeypatch.setattr(privsep, "LEASE_DIR", tmp_path / "leases")
    monkeypatch.setattr(privsep, "HELPER_UID_COUNT", 2)
    a = privsep.lease_uid()
    b = privsep.lease_uid()
    assert {a.uid, b.uid} == {privsep.HELPER_UID_BASE, privsep.HELPER_UID_BASE + 1}
    with pytest.raises(VMError):
        privsep.lease_uid()  # both taken by a live owner (us)
    (tmp_path / "leases" / str(a.uid)).write_text("999999999 1\n")  # owner gone
    c = privsep.lease_uid()
    assert c.uid == a.uid
    b.release()
    c.release()
    assert list((tmp_path / "leases").iterdir()) == []
    assert oct((tmp_path / "leases").stat().st_mode & 0o777) == "0o700"


def test_sweep_never_trusts_files_a_helper_could_write(tmp_path, monkeypatch):
    """A VM dir belongs to its helpers' uid: pids/owner files not owned by us, symlinked or
    hard-linked are ignored (a compromised helper must not make root kill arbitrary processes)."""
    monkeypatch.setenv("CAPSEM_RUNTIME_DIR", str(tmp_path))
    victim = subprocess.Popen(["sleep", "600"])
    try:
        start = runtime._start_time(victim.pid)
        planted = f"{victim.pid} {start}\n"
        cases = {}
        d = tmp_path / "vm-symlink"
        d.mkdir()
        (tmp_path / "elsewhere").write_text(planted)
        (d / "pids").symlink_to(tmp_path / "elsewhere")
        cases["symlink"] = d
        d = tmp_path / "vm-hardlink"
        d.mkdir()
        os.link(tmp_path / "elsewhere", d / "pids")
        cases["hardlink"] = d
        if ROOT:
            d = tmp_path / "vm-foreign"
            d.mkdir()
            (d / "pids").write_text(planted)
            os.chown(d / "pids", HELPER, HELPER)
            cases["foreign owner"] = d
        for d in cases.values():
            old = time.time() - 3600
            os.utime(d, (old, old))
        assert runtime.sweep_stale() == len(cases)
        assert victim.poll() is None, "sweep killed a process named by an untrusted pids file"
    finally:
        victim.kill()
        victim.wait()


def test_record_pids_never_writes_through_a_planted_link(tmp_path):
    rp = RuntimePaths(tmp_path)
    target = tmp_path / "target"
    target.write_text("precious\n")
    (tmp_path / "pids").symlink_to(target)

    class P:
        pid = os.getpid()
    runtime.record_pids(rp, [P()])
    assert target.read_text() == "precious\n"
    assert not (tmp_path / "pids").is_symlink() and str(os.getpid()) in (tmp_path / "pids").read_text()


# System trees are refused with everything inside them, however the path is spelled; shared roots
# (/tmp, /home, ...) are refused themselves only.
SYSTEM_TREE_PATHS = ["/etc/ssh", "/etc/", "//etc", "/./etc/cron.d", "/tmp/../etc/x", "/usr/lib/python3",
                     "/usr/../usr/bin", "/bin/sh", "/sbin", "/lib", "/lib/x86_64-linux-gnu", "/lib64/x",
                     "/lib32", "/libx32/y", "/libfoo", "/boot/grub", "/root", "/root/project/", "/proc/1",
                     "/proc/self/cwd", "/sys/fs", "/dev/shm", "/dev/shm/x/", "/var", "/var/lib/dpkg",
                     "/var/log", "/var/cache/capsem", "/var/tmp/../lib/x", "/var/tmp/x/../../spool"]
SHARED_ROOT_PATHS = ["/", "/tmp", "/tmp/", "/var/tmp", "/var/tmp/", "/var/./tmp", "/home", "/mnt", "/srv", "/opt",
                     "/media", "/run"]


@pytest.mark.parametrize("path", ["~", "DATA", "DATA/ca", "CONFIG", "RUNTIME", "LINK-ETC", "LINK-ETC/ssh",
                                  "LINK-VARLIB", "LINK-TO-LINK", "DOTDOT", "RELATIVE"]
                         + SYSTEM_TREE_PATHS + SHARED_ROOT_PATHS)
def test_folders_that_would_expose_the_host_are_never_shared(path, tmp_path, monkeypatch):
    monkeypatch.setenv("CAPSEM_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("CAPSEM_CONFIG_DIR", str(tmp_path / "config"))
    monkeypatch.setenv("CAPSEM_RUNTIME_DIR", str(tmp_path / "rt"))
    (tmp_path / "link-etc").symlink_to("/etc")
    (tmp_path / "link-varlib").symlink_to("/var/lib/")
    (tmp_path / "link-to-link").symlink_to(tmp_path / "link-etc" / "default")
    monkeypatch.chdir(tmp_path)
    path = {"DATA": str(tmp_path / "data"), "DATA/ca": str(tmp_path / "data" / "ca"),
            "CONFIG": str(tmp_path), "RUNTIME": str(tmp_path / "rt"), "LINK-ETC": str(tmp_path / "link-etc"),
            "LINK-ETC/ssh": str(tmp_path / "link-etc" / "ssh"), "LINK-VARLIB": str(tmp_path / "link-varlib"),
            "LINK-TO-LINK": str(tmp_path / "link-to-link"),
            "DOTDOT": str(tmp_path) + "/../" * len(tmp_path.parts) + "usr/share",
            "RELATIVE": "../" * len(tmp_path.parts) + "etc"}.get(path, path)
    with pytest.raises(VMError, match="refusing to share"):
        virtiofs.check_share_path(os.path.expanduser(path))


_SEGMENT = st.text(alphabet="abcxyz0123456789_-.", min_size=1, max_size=12).filter(lambda s: s not in (".", ".."))


@given(tree=st.sampled_from(["/etc", "/usr", "/bin", "/sbin", "/boot", "/root", "/proc", "/sys", "/dev", "/var",
                             "/lib", "/lib64", "/lib32", "/libx32", "/libexec2"]),
       segments=st.lists(_SEGMENT, max_size=4), slash=st.booleans())
@settings(max_examples=300, deadline=None)
def test_every_path_inside_a_system_tree_is_refused(tree, segments, slash):
    path = "/".join([tree, *segments]) + ("/" if slash else "")
    if Path(path).resolve().is_relative_to("/var/tmp") and Path(path).resolve() != Path("/var/tmp"):
        return  # (/var/tmp/...: the exception, checked below)
    with pytest.raises(VMError, match="refusing to share"):
        virtiofs.check_share_path(path)


@given(root=st.sampled_from(["/var/tmp", "/srv", "/opt", "/mnt", "/media", "/tmp"]),
       segments=st.lists(_SEGMENT, min_size=1, max_size=4))
@settings(max_examples=200, deadline=None)
def test_project_folders_below_shared_roots_are_allowed(root, segments):
    path = Path(root, "capsem-no-such-project-" + segments[0], *segments[1:])
    assert virtiofs.check_share_path(path) == path


def test_a_project_folder_is_shared(tmp_path):
    (tmp_path / "project").mkdir()
    assert virtiofs.check_share_path(tmp_path / "project") == (tmp_path / "project").resolve()


def test_helper_logs_are_capped_and_keep_the_tail(tmp_path):
    log = caplog.CappedLog(tmp_path / "console.log", limit=1000)
    proc = subprocess.Popen([sys.executable, "-c",
                             "import sys; sys.stdout.write('a' * 5_000_000 + 'THE END'); sys.stdout.flush()"],
                            stdout=log.fd, pass_fds=(log.fd,))
    log.close_writer()
    proc.wait(timeout=60)
    log.wait(30)
    data = (tmp_path / "console.log").read_bytes()
    assert data.startswith(b"a" * 1000) and data.endswith(b"THE END")
    assert len(data) < 1000 + caplog.TAIL + 200
    assert b"5000007" not in data and b"4999007 more bytes dropped" in data


def test_vm_cannot_ask_for_more_than_the_host_has(monkeypatch):
    from capsem_vm.vm import check_host_resources
    check_host_resources(VMConfig(memory_mb=256, cpus=1))
    with pytest.raises(VMError, match="CPUs but this host has"):
        check_host_resources(VMConfig(cpus=len(os.sched_getaffinity(0)) + 1))
    with pytest.raises(VMError, match="MB of memory but this host has"):
        check_host_resources(VMConfig(memory_mb=1 << 20))


def test_guest_writable_root_is_capped():
    from capsem_vm import qemu
    assert "capsem.overlay_mb=512" in qemu.kernel_cmdline(VMConfig(memory_mb=1024))
    init = (Path(__file__).resolve().parents[2] / "guest-agent" / "init").read_text()
    assert "size=$overlay_size" in init


def test_kernel_vsock_qemu_gets_the_device_as_an_fd(tmp_path):
    from capsem_vm.vsock.vhost_kernel import KernelTransport
    t = KernelTransport(RuntimePaths(tmp_path))
    t._vhost_fd = 42
    assert t.qemu_args() == ["-device", f"vhost-vsock-pci,guest-cid={t.cid},vhostfd=42"]
    assert t.qemu_fds() == (42,)
