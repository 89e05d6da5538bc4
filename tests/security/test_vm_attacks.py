"""Raw guest-side attacks on one real VM (booted once for the module), run as root in the guest
through the control connection: the helpers' sandbox, the share, vsock, the serial console, the
writable root, and finally forged frames on the agent's own control connection (destructive:
last).

Each test asserts the attack fails, the host is unchanged, and the host side kept working.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import secrets
import shutil
import stat
import tempfile
import time
from pathlib import Path

import pytest

import guest_scripts as gs
from host_helpers import helper_processes
from kernel_helpers import running_vm, vm_exec

from capsem_kernel import loop_thread
from capsem_vm import privsep
from capsem_vm.config import Share, VMConfig

pytestmark = pytest.mark.vm
SHARE_OWNER = 4321  # the rw share belongs to a non-root user: virtiofsd must run as that user
MEMORY_MB = 512


class Env:
    pass


def _snapshot(root: Path) -> dict:
    """Every path under root with its mode, owner and content hash."""
    snap = {}
    for p in sorted(root.rglob("*")):
        st = p.lstat()
        digest = hashlib.sha256(p.read_bytes()).hexdigest() if stat.S_ISREG(st.st_mode) else ""
        snap[str(p.relative_to(root))] = (stat.filemode(st.st_mode), st.st_uid, st.st_gid, digest)
    return snap


@pytest.fixture(scope="module")
def env(tmp_path_factory, image_dir):
    e = Env()
    # not under pytest's 0700 tmp root: the share's owner (not root) must be able to reach it
    base = Path(tempfile.mkdtemp(prefix="capsem-secvm-"))
    os.chmod(base, 0o755)
    e.outside = base / "outside"
    e.outside.mkdir()
    e.token = "capsem-canary-" + secrets.token_hex(16)
    (e.outside / "secret.txt").write_text(e.token)
    os.chmod(e.outside / "secret.txt", 0o600)
    e.share = base / "share"
    e.share.mkdir()
    (e.share / ".git" / "hooks").mkdir(parents=True)
    (e.share / ".git" / "config").write_text("[core]\n\tbare = false\n")
    (e.share / "data.csv").write_text("a,b\n1,2\n")
    for p in [e.share, *e.share.rglob("*")]:
        os.chown(p, SHARE_OWNER, SHARE_OWNER)
    e.ro = base / "ro"
    e.ro.mkdir()
    (e.ro / "keep.txt").write_text("keep")
    # a root-owned share below pytest's root-only (0700) tmp root, like `make demo`'s and CI's
    e.rootshare = tmp_path_factory.mktemp("rootshare")
    (e.rootshare / "seed.txt").write_text("seed\n")
    e.root_outside = tmp_path_factory.mktemp("rootoutside")
    (e.root_outside / "secret.txt").write_text(e.token)
    e.before_root_outside = _snapshot(e.root_outside)
    e.runtime = Path("/tmp") / f"capsem-sec-{os.getpid()}"
    e.runtime.mkdir(mode=0o700)
    e.before_outside = _snapshot(e.outside)
    e.events = []
    try:
        with running_vm(VMConfig(memory_mb=MEMORY_MB, cpus=1, shares=(
                Share(e.share, "nb"), Share(e.ro, "ro", readonly=True), Share(e.rootshare, "rootnb"))),
                {"CAPSEM_RUNTIME_DIR": str(e.runtime)}) as e.vm:
            e.vm.on_event = e.events.append
            yield e
    finally:
        assert helper_processes(str(e.runtime), str(e.share), str(e.ro), str(e.rootshare)) == []
        shutil.rmtree(e.runtime, ignore_errors=True)
        shutil.rmtree(base, ignore_errors=True)


def run(e, argv, timeout=300, cwd=None):
    return vm_exec(e.vm, argv, timeout, cwd=cwd)


def run_json(e, script, *args, timeout=300):
    code, out, err = run(e, ["python3", "-c", script, *map(str, args)], timeout)
    assert code == 0, err
    return json.loads(out.strip().splitlines()[-1])


def _status(pid: int) -> dict:
    return dict(line.split(":\t", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":\t" in line)


def _cmdline(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")[:-1]


# --- the helpers' sandbox ----------------------------------------------------------------------

def test_qemu_is_seccomp_sandboxed_unprivileged_and_has_no_nic(env):
    vm = env.vm
    qemu = _status(vm.qemu.pid)
    assert qemu["Seccomp"].strip() == "2" and qemu["NoNewPrivs"].strip() == "1"
    uid = vm.identity.uid
    assert privsep.HELPER_UID_BASE <= uid < privsep.HELPER_UID_BASE + privsep.HELPER_UID_COUNT
    assert qemu["Uid"].split() == [str(uid)] * 4 and qemu["Gid"].split() == [str(uid)] * 4
    assert qemu["Groups"].strip() == "" and int(qemu["CapEff"], 16) == 0 and int(qemu["CapBnd"], 16) != 0
    argv = _cmdline(vm.qemu.pid)
    assert "-nodefaults" in argv
    assert not {"-netdev", "-nic", "-net", "-usb", "-usbdevice"} & set(argv)
    assert argv[argv.index("-sandbox") + 1] == "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"
    devices = [argv[i + 1] for i, a in enumerate(argv) if a == "-device"]
    assert sorted(d.split(",")[0] for d in devices) == sorted(
        ["virtio-blk-pci", "pcie-root-port", "vhost-user-vsock-pci", "virtio-balloon-pci"] + ["vhost-user-fs-pci"] * 3)
    # the balloon does free page reporting only (SECURITY.md): no stats polling, no deflate-on-OOM
    balloon = next(d for d in devices if d.startswith("virtio-balloon-pci"))
    assert "free-page-reporting=on" in balloon.split(",")
    assert not {"deflate-on-oom=on", "free-page-hint=on"} & set(balloon.split(",")) and "guest-stats" not in balloon
    # the only host paths QEMU opens: the verified assets (fds), and its own 0700 VM dir
    assert Path(f"/proc/{vm.qemu.pid}/cwd").resolve() == vm.paths.root
    open_paths = {os.readlink(f"/proc/{vm.qemu.pid}/fd/{fd}") for fd in os.listdir(f"/proc/{vm.qemu.pid}/fd")}
    files = {p for p in open_paths if p.startswith("/") and not p.startswith(("/dev/", "/memfd:"))}
    from capsem_vm.image.store import resolve_image
    allowed = {str(p.resolve()) for p in Path(env.vm.paths.root).iterdir()}
    allowed |= {str(p.resolve()) for p in resolve_image(vm.config.image).resolve().iterdir()}
    assert files <= allowed, files - allowed
    # the guest sees loopback only (this VM has no egress)
    code, out, _ = run(env, ["ls", "/sys/class/net"])
    assert out.split() == ["lo"]


def test_vsock_backend_and_virtiofsd_are_unprivileged(env):
    vm = env.vm
    vsock = next(p for p in vm.helpers if p.name == "vhost-device-vsock")
    st = _status(vsock.pid)
    assert st["Uid"].split() == [str(vm.identity.uid)] * 4 and int(st["CapEff"], 16) == 0
    # under its seccomp deny filter (seccomp.VSOCK_RULES), launched through the exec gate
    assert st["Seccomp"].strip() == "2" and st["NoNewPrivs"].strip() == "1", (st["Seccomp"], st["NoNewPrivs"])
    init_userns = os.readlink("/proc/self/ns/user")  # ours: the namespace capsem runs in
    fs_uids = set()
    for proc in vm.helpers:
        if not proc.name.startswith("virtiofsd"):
            continue
        st = _status(proc.pid)
        share = {"virtiofsd[nb]": env.share, "virtiofsd[ro]": env.ro, "virtiofsd[rootnb]": env.rootshare}[proc.name]
        owner = share.stat().st_uid
        # never root, never the folder's owner: a uid leased for this virtiofsd alone (idmapped mount)
        uid = int(st["Uid"].split()[0])
        assert st["Uid"].split() == [str(uid)] * 4 and st["Gid"].split() == [str(uid)] * 4, (proc.name, st["Uid"])
        assert privsep.HELPER_UID_BASE <= uid < privsep.HELPER_UID_BASE + privsep.HELPER_UID_COUNT
        assert uid not in (0, owner, vm.identity.uid) and st["Groups"].strip() == "", (proc.name, uid)
        fs_uids.add(uid)
        assert st["Seccomp"].strip() == "2" and st["NoNewPrivs"].strip() == "1"
        # in a user namespace of its own: whatever capabilities it holds are not the host's
        assert os.readlink(f"/proc/{proc.pid}/ns/user") != init_userns
    assert len(fs_uids) == 3  # one uid per virtiofsd
    # the VM dir: 0700, owned by the helpers' uid, holds every socket
    root = vm.paths.root.stat()
    assert stat.S_IMODE(root.st_mode) == 0o700 and root.st_uid == vm.identity.uid
    assert stat.S_IMODE(vm.paths.root.parent.stat().st_mode) == 0o700


# --- the share ---------------------------------------------------------------------------------

@pytest.mark.parametrize("which", ["user-owned", "root-owned"])
def test_share_cannot_be_used_to_read_host_files(env, which):
    share, outside = (env.share, env.outside) if which == "user-owned" else (env.rootshare, env.root_outside)
    half = len(env.token) // 2
    res = run_json(env, gs.SHARE_READS, share, outside, env.token[:half], env.token[half:])
    assert res["token found"] == [], res
    assert env.token not in json.dumps(res)
    for name in ("dotdot", "absolute", "proc self root", "proc 1 root"):
        assert res[name] == "ENOENT", (name, res[name])
    assert res["symlink to outside"] == res["symlink to shadow"] == "EPERM"
    assert res["hard link in"] == "EXDEV" and res["hard link of outside"] in ("ENOENT", "EXDEV")
    assert res["open_by_handle_at"] in ("EOPNOTSUPP", "ESTALE", "EINVAL", "EBADF", "EPERM", "ENOTSUP")
    # the guest's own bind mount stays in the guest: the host folder is an empty dir
    assert not any((share / "bind").iterdir()) if (share / "bind").exists() else True
    assert _snapshot(env.outside) == env.before_outside
    assert _snapshot(env.root_outside) == env.before_root_outside


def test_what_the_guest_creates_in_a_root_owned_share_belongs_to_root(env):
    """The root-owned folder's virtiofsd is not root (above), yet the host sees the guest's files
    owned by the folder's owner, root, as before; other owners stay out of reach."""
    fsd = next(p for p in env.vm.helpers if p.name == "virtiofsd[rootnb]")
    uids = set(_status(fsd.pid)["Uid"].split())
    assert len(uids) == 1 and "0" not in uids, uids  # on main this virtiofsd was root
    code, out, err = run(env, ["sh", "-c", f"cd {env.rootshare} && echo hi > new.txt && mkdir -p d/e && "
                                           f"echo x > d/e/f && echo more >> seed.txt && chown 1000 new.txt; "
                                           f"echo chown=$?; stat -c '%u %g' new.txt seed.txt"])
    assert code == 0, err
    assert "chown=0" not in out  # no other uid exists in virtiofsd's namespace
    assert out.split()[-4:] == ["0", "0", "0", "0"]  # the guest (root) sees root's files as root's
    for p in ("new.txt", "d", "d/e", "d/e/f", "seed.txt"):
        st = (env.rootshare / p).lstat()
        assert (st.st_uid, st.st_gid) == (0, 0), (p, st.st_uid, st.st_gid)
    assert (env.rootshare / "seed.txt").read_text() == "seed\nmore\n"
    assert (env.rootshare / "new.txt").read_text() == "hi\n"


def test_share_cannot_plant_setid_devices_links_or_xattrs(env):
    res = run_json(env, gs.SHARE_WRITES, env.share)
    print("\n" + json.dumps(res, indent=1))
    # mkdir(2) drops set-id bits in the guest's VFS already: it succeeds, without them (checked below)
    assert res["mkdir setgid"] in ("ok", "EPERM")
    for name in ("chmod u+s", "chmod g+s", "create setuid", "char device", "block device",
                 "fifo", "unix socket", "symlink", "user xattr", "file capability", "acl"):
        assert res[name] in ("EPERM", "EOPNOTSUPP", "ENOTSUP", "EACCES"), (name, res[name])
    assert res["chown to uid 1000"] in ("EINVAL", "EPERM")  # no such user in virtiofsd's namespace
    assert res["plain write"] == "ok" and (env.share / "ok.txt").read_text() == "fine"
    # .git is read-only: git would run its hooks and config commands on the host
    for name in ("git config", "git hook", "git dir rename"):  # EPERM: the share guard refuses before the mount
        assert res[name] in ("EROFS", "EBUSY", "EXDEV", "EPERM"), (name, res[name])
    assert (env.share / ".git" / "config").read_text() == "[core]\n\tbare = false\n"
    assert list((env.share / ".git" / "hooks").iterdir()) == []
    # on the host: only regular files and dirs, none set-id, all owned by the folder's owner, no xattrs
    for p in [env.share, *env.share.rglob("*")]:
        st = p.lstat()
        assert stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode), (p, stat.filemode(st.st_mode))
        assert not st.st_mode & (stat.S_ISUID | stat.S_ISGID), (p, stat.filemode(st.st_mode))
        assert st.st_uid == SHARE_OWNER and st.st_gid == SHARE_OWNER, (p, st.st_uid)
        assert os.listxattr(p, follow_symlinks=False) == [], p
    assert (env.share / "sh").stat().st_mode & 0o777 == 0o755
    assert _snapshot(env.outside) == env.before_outside


def test_read_only_share_stays_read_only(env):
    code, out, _ = run(env, ["sh", "-c", f"echo x > {env.ro}/new; echo rc=$?; mount -o remount,rw {env.ro}; "
                                         f"echo y > {env.ro}/new2; echo rc2=$?; rm -f {env.ro}/keep.txt"])
    assert "rc=0" not in out and "rc2=0" not in out
    assert sorted(p.name for p in env.ro.iterdir()) == ["keep.txt"]


# --- vsock ---------------------------------------------------------------------------------------

@pytest.mark.timeout(1800)
def test_only_the_control_port_answers_on_the_host_cid(env):
    """Every port 0-65535 on CID 2 from inside the guest. This VM has no egress: only 5000
    exists, and it drops any connection but the agent's first one."""
    t0 = time.monotonic()
    res = run_json(env, gs.PORT_SCAN, 2, 0, 65535, 10, timeout=1500)
    print(f"\nscan of CID 2: {res['seconds']} s in the guest, {time.monotonic() - t0:.0f} s total; {res['errors']}")
    assert res["scanned"] == 65536
    assert res["accepted"] == [5000], res
    assert res["behaviour"]["5000"] in ("eof", "ECONNRESET", "EPIPE"), res
    assert res["timed_out"] == 0, res
    assert env.vm.refused_control >= 2
    loop_thread.run_sync(env.vm.control.ping(), 30)  # the real control connection is untouched


@pytest.mark.parametrize("cid", [1, 3, 4, 100])
def test_other_cids_reach_no_host_service(env, cid):
    res = run_json(env, gs.PORT_SCAN, cid, 4990, 5010, 10, timeout=300)
    # CID 3 is the guest itself (and 1 its loopback): only its own agent listens there (5001)
    own = {5001} if cid in (1, 3) else set()
    assert set(res["accepted"]) <= own, res
    if cid in (1, 3):
        for port in res["accepted"]:
            assert res["behaviour"][str(port)] in ("eof", "open (no answer)")


# --- resources -----------------------------------------------------------------------------------

def _rss_mb(pid: int) -> float:
    return int(_status(pid)["VmRSS"].split()[0]) / 1024


def test_serial_console_flood_is_capped_on_the_host(env):
    code, out, err = run(env, ["sh", "-c", "head -c 3000000 /dev/zero | tr '\\0' x > /dev/ttyS0; echo done"],
                         timeout=600)
    assert "done" in out, err
    size = env.vm.paths.console_log.stat().st_size
    assert size <= (1 << 20), f"console.log grew to {size} bytes"


def test_writable_root_and_tmp_are_capped(env):
    qemu_before = _rss_mb(env.vm.qemu.pid)
    code, out, err = run(env, ["sh", "-c",
                               "dd if=/dev/zero of=/big bs=1M count=600 2>&1; ls -l /big; rm -f /big; "
                               "dd if=/dev/zero of=/tmp/big bs=1M count=600 2>&1; ls -l /tmp/big; "
                               "rm -f /tmp/big"], timeout=600)
    assert out.count("No space left on device") == 2, out
    sizes = [int(line.split()[4]) for line in out.splitlines() if line.startswith("-")]
    assert sizes[0] <= (MEMORY_MB // 2 + 1) << 20 and sizes[1] <= (MEMORY_MB // 4 + 1) << 20, sizes
    assert _rss_mb(env.vm.qemu.pid) < MEMORY_MB + 600, (qemu_before, _rss_mb(env.vm.qemu.pid))
    loop_thread.run_sync(env.vm.control.ping(), 30)


# --- the control connection (destructive: last) ----------------------------------------------------

def test_forged_frames_on_the_agents_connection_do_not_confuse_the_host(env):
    """Guest root steals the agent's own vsock socket (pidfd_getfd) and writes well-formed lies:
    replies to requests nobody made, a second hello, a fake kernel death, unknown types."""
    before = len(env.events)
    res = run_json(env, gs.FORGE, "benign", "/dev/null")
    assert res["found"] and res["sent"] == 7, res
    loop_thread.run_sync(env.vm.control.ping(), 30)
    code, out, _ = run(env, ["echo", "still served"])
    assert out == "still served\n"
    kinds = sorted(m.get("t") for m in env.events[before:])
    assert "kernel_exit" in kinds and "zzz" in kinds and "closed" not in kinds, kinds
    assert env.vm.alive()


def test_truncated_then_garbage_frame_fails_closed(env):
    """A frame that never completes stalls only this VM's control channel (bounded buffer, host
    requests time out); when it completes as garbage, the host drops the VM, and stop() cleans up."""
    out_file = env.share / "forge.json"
    (env.share / "forge.py").write_text(gs.FORGE)
    # started, not awaited: its own output travels on the connection it is about to break
    loop_thread.run_sync(env.vm.control.exec(["python3", f"{env.share}/forge.py", "truncate-then-garbage",
                                              str(out_file), "20"]), 60)
    deadline = time.monotonic() + 60
    while not out_file.exists():
        assert time.monotonic() < deadline
        time.sleep(0.2)
    time.sleep(1)
    control = env.vm.control
    with pytest.raises((asyncio.TimeoutError, TimeoutError)):
        loop_thread.run_sync(control.ping(timeout=3), 10)
    assert control._decoder.pending <= (1 << 20) + 4
    t0 = time.monotonic()
    loop_thread.run_sync(asyncio.sleep(0.01), 5)  # the host loop stays responsive
    assert time.monotonic() - t0 < 2
    loop_thread.run_sync(asyncio.wait_for(control.closed.wait(), 120), 130)
    assert not env.vm.alive()
    assert any(m.get("t") == "closed" for m in env.events)
    pids = [env.vm.qemu.pid] + [p.pid for p in env.vm.helpers]
    loop_thread.run_sync(env.vm.stop(), 120)
    assert all(not Path(f"/proc/{p}").exists() or "State:\tZ" in Path(f"/proc/{p}/status").read_text()
               for p in pids)
    assert not env.vm.paths.root.exists()
    assert not (privsep.LEASE_DIR / str(env.vm.identity.uid)).exists()
