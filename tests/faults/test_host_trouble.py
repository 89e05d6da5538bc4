"""Host trouble (issue 21): a full file system (notebook folder, runtime dir, audit database), a
locked audit database, a helper program removed or replaced by an upgrade. Each gives an error that
names the cause and what to do, fails closed where egress is concerned, and loses nothing already
written. Full file systems are real tmpfs mounts in a child's own mount namespace (private_fs.py);
the real disk is never filled."""

from __future__ import annotations

import asyncio
import errno
import os
import shutil
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from capsem_vm import helpers
from capsem_vm.errors import MissingHelperError, VMError
from capsem_vm.proxy.audit import AuditLog, read_events, unwritable_hint
from host_helpers import CAPSEM, helper_processes
from private_fs import run_child

# --- the audit database ------------------------------------------------------------------------

AUDIT_FULL_AT_START = '''
os.environ["CAPSEM_DATA_DIR"] = str(MNT / "data")
from capsem_vm.proxy.audit import AuditLog, read_events
db = MNT / "data" / "audit.sqlite3"
fill(MNT / "filler")
t0 = time.monotonic()
log = AuditLog(db)                      # main: sqlite3.OperationalError, the worker/bridge never starts
started_s = time.monotonic() - t0
out = {"started_s": started_s, "available_full": log.available, "last_error": log.last_error}
log.record("k-full", "http", method="GET", url="http://a.example/", decision="deny", rule="audit-unavailable")
out["flush_full"] = log.flush(3)
os.unlink(MNT / "filler")               # space again: the held rows are written, the log is available
t0 = time.monotonic()
out["flush_after"] = log.flush(10)
out["resumed_s"] = time.monotonic() - t0
out["available_after"] = log.available
out["rows"] = [(r["kind"], r["code"], r["kernel"]) for r in read_events(db)]
log.close()
print(json.dumps(out))
'''


def test_audit_database_full_at_start_refuses_egress_then_resumes_without_losing_rows(tmp_path):
    r = run_child(AUDIT_FULL_AT_START, tmp_path / "mnt", size="256k")
    assert r["started_s"] < 3 and r["available_full"] is False
    assert "full" in r["last_error"]
    # the log line names the file, the cause and what to do
    err = r["_stderr"]
    assert "cannot write" in err and "audit.sqlite3" in err and "audit-unavailable" in err
    assert "is full: free space there" in err and "CAPSEM_DATA_DIR" in err
    assert r["flush_full"] is False
    assert r["flush_after"] is True and r["available_after"] is True
    assert ("http", "audit-unavailable", "k-full") in [tuple(x) for x in r["rows"]]  # nothing recorded is lost
    assert ("note", "audit-unavailable", "-") in [tuple(x) for x in r["rows"]]  # the gap is on record
    assert "works again" in err


class _Locker:
    """Another process holding the database's write lock (BEGIN EXCLUSIVE) until released."""

    def __init__(self, db: Path):
        self.proc = subprocess.Popen(
            [sys.executable, "-c", "import sqlite3, sys\n"
             "con = sqlite3.connect(sys.argv[1], isolation_level=None, timeout=30)\n"
             "con.execute('PRAGMA journal_mode=WAL'); con.execute('CREATE TABLE IF NOT EXISTS t (x)')\n"
             "con.execute('BEGIN EXCLUSIVE'); print('locked', flush=True); sys.stdin.read()", str(db)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout.readline().strip() == "locked"

    def release(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(10)


def test_audit_database_locked_at_start_refuses_egress_then_resumes(tmp_path, capfd):
    db = tmp_path / "audit.sqlite3"
    locker = _Locker(db)
    try:
        t0 = time.monotonic()
        log = AuditLog(db)  # main: waits 10 s, then sqlite3.OperationalError "database is locked"
        started_s = time.monotonic() - t0
        assert started_s < 4 and not log.available and "locked" in log.last_error
        log.record("k-lock", "dns", url="a.example", decision="deny", rule="audit-unavailable")
        assert not log.flush(1)
    finally:
        locker.release()
    try:
        assert log.flush(10) and log.available
        rows = [(r["kind"], r["code"]) for r in read_events(db)]
        assert ("dns", "audit-unavailable") in rows and ("note", "audit-unavailable") in rows
    finally:
        log.close()
    err = capfd.readouterr().err
    assert "write lock" in err and "fuser" in err


async def test_proxy_and_bridge_started_on_a_locked_audit_database_refuse_egress_then_resume(tmp_path):
    """The real proxy service (a worker process) and bridge, started while another process holds the
    audit database's write lock: both start (main: the worker died at start on 'database is locked'),
    egress is refused with audit-unavailable, and allowed again once the lock is gone."""
    from proxy_helpers import wait_for
    from test_audit_contract import _make_world
    db = tmp_path / "audit.sqlite3"
    locker = _Locker(db)
    released = False
    try:
        w = await _make_world(tmp_path, db, workers=1)
        try:
            r = await asyncio.to_thread(w.g.http, "GET", "ok.test.example", w.port, "/ok")
            assert r.status != 200, "egress went out while the audit log could not be written"
            assert "audit-unavailable" in (r.policy or "") or r.reply.get("rule") == "audit-unavailable", r.reply
            locker.release()
            released = True

            def allowed():
                return w.g.http("GET", "ok.test.example", w.port, "/ok").status == 200
            assert await asyncio.to_thread(wait_for, allowed, 30)
            assert await w.service.flush_audit() and await asyncio.to_thread(w.audit.flush)
            rows = read_events(db)
            assert any(r["kind"] == "note" and r["code"] == "audit-unavailable" for r in rows)
            assert any(r["decision"] == "allow" and r["kernel"] == "k-audit" for r in rows)
        finally:
            await w.close()
    finally:
        if not released:
            locker.release()


@pytest.mark.parametrize("exc,words", [
    (sqlite3.OperationalError("database or disk is full"), ["is full", "CAPSEM_DATA_DIR"]),
    (OSError(errno.ENOSPC, "No space left on device"), ["is full"]),
    (OSError(errno.EDQUOT, "Disk quota exceeded"), ["is full"]),
    (sqlite3.OperationalError("database is locked"), ["write lock", "fuser"]),
    (sqlite3.OperationalError("attempt to write a readonly database"), ["read-only"]),
    (OSError(errno.EROFS, "Read-only file system"), ["read-only"]),
    (sqlite3.DatabaseError("file is not a database"), ["check"]),
])
def test_every_unwritable_cause_gets_a_hint_naming_it(exc, words):
    hint = unwritable_hint(exc, Path("/d/audit.sqlite3"))
    assert all(w in hint for w in words), hint


# --- the runtime dir ---------------------------------------------------------------------------

RUNTIME_FULL = '''
os.environ["CAPSEM_RUNTIME_DIR"] = str(MNT / "rt")
from capsem_vm import runtime
from capsem_vm.errors import VMError
(MNT / "rt").mkdir(mode=0o700)
fill(MNT / "filler")
try:
    runtime.create_vm_dir()
    out = {"error": None}
except VMError as exc:
    out = {"error": str(exc), "type": "VMError"}
except Exception as exc:
    out = {"error": str(exc), "type": type(exc).__name__}
out["left"] = sorted(os.listdir(MNT / "rt"))
print(json.dumps(out))
'''


def test_runtime_dir_full_is_a_clear_error_and_leaves_no_vm_dir(tmp_path):
    r = run_child(RUNTIME_FULL, tmp_path / "mnt", size="256k")
    assert r["type"] == "VMError", r
    assert "cannot create the VM's runtime directory" in r["error"] and "No space left" in r["error"]
    assert "is full" in r["error"] and "CAPSEM_RUNTIME_DIR" in r["error"]
    assert r["left"] == [], r  # main: an empty vm-* dir without owner file, until a sweep


# --- a helper program removed or replaced after it was found -----------------------------------

FINDERS = [("qemu", "CAPSEM_QEMU"), ("virtiofsd", "CAPSEM_VIRTIOFSD"),
           ("vhost_device_vsock", "CAPSEM_VHOST_DEVICE_VSOCK"), ("unshare", "CAPSEM_UNSHARE"),
           ("setpriv", "CAPSEM_SETPRIV")]


@pytest.mark.parametrize("finder,env_var", FINDERS)
def test_a_helper_removed_after_it_was_found_is_named_not_run(monkeypatch, tmp_path, finder, env_var):
    find = getattr(helpers, finder)
    program = tmp_path / "prog"
    program.write_bytes(b"#!/bin/sh\n# source=PATH\n")
    program.chmod(0o755)
    monkeypatch.setenv(env_var, str(program))
    find.cache_clear()
    try:
        assert find().path == program
        program.unlink()  # an upgrade removed it while this process (a Jupyter server) ran
        with pytest.raises(MissingHelperError) as err:
            find()  # main: the cached path, a bare ENOENT at the next spawn
        text = str(err.value)
        assert f"{env_var}={program}" in text and "not an executable file" in text and "make system" in text
    finally:
        find.cache_clear()


def test_a_replaced_virtiofsd_is_read_again_for_its_flag_dialect(monkeypatch, tmp_path):
    program = tmp_path / "virtiofsd"
    program.write_bytes(b"#!/bin/sh\n# -o source=PATH\n")
    program.chmod(0o755)
    monkeypatch.setenv("CAPSEM_VIRTIOFSD", str(program))
    helpers.virtiofsd.cache_clear()
    try:
        assert helpers.virtiofsd().dialect == "c"
        new = tmp_path / "virtiofsd.new"  # what a package upgrade does: a new file renamed over the old
        new.write_bytes(b"#!/bin/sh\n# --shared-dir\n")
        new.chmod(0o755)
        os.utime(new, ns=(1, 1))
        new.rename(program)
        assert helpers.virtiofsd().dialect == "rust"  # main: "c", the new binary run with the old flags
        other = tmp_path / "other"
        shutil.copy(program, other)
        monkeypatch.setenv("CAPSEM_VIRTIOFSD", str(other))
        assert helpers.virtiofsd().path == other  # a changed override is looked up again
    finally:
        helpers.virtiofsd.cache_clear()


# --- real VMs ----------------------------------------------------------------------------------

@pytest.mark.vm
@pytest.mark.parametrize("finder,env_var,real", [
    ("qemu", "CAPSEM_QEMU", lambda: helpers.qemu().path),
    ("virtiofsd", "CAPSEM_VIRTIOFSD", lambda: helpers.virtiofsd().path),
    ("vhost_device_vsock", "CAPSEM_VHOST_DEVICE_VSOCK", lambda: helpers.vhost_device_vsock().path)],
    ids=["qemu", "virtiofsd", "vhost-device-vsock"])
async def test_a_helper_removed_by_an_upgrade_fails_the_next_vm_naming_it(image_dir, runtime_root, tmp_path,
                                                                        monkeypatch, finder, env_var, real):
    """The real program, found (as a running server would have), then removed: the next VM start
    fails with MissingHelperError naming it, and leaves no process and no runtime dir."""
    from capsem_vm.config import Share, VMConfig
    from capsem_vm.vm import VM
    find = getattr(helpers, finder)
    find.cache_clear()
    copy = tmp_path / "bin" / Path(str(real())).name
    copy.parent.mkdir()
    shutil.copy2(real(), copy)
    monkeypatch.setenv(env_var, str(copy))
    find.cache_clear()
    try:
        assert find().path == copy
        copy.unlink()
        share = tmp_path / "nb"
        share.mkdir()
        vm = VM(VMConfig(memory_mb=512, cpus=1, shares=(Share(share, "nb"),)))
        with pytest.raises(MissingHelperError) as err:  # main: FileNotFoundError from the spawn
            await asyncio.wait_for(vm.start(), 120)
        assert f"{env_var}={copy}" in str(err.value) and "make system" in str(err.value)
        await vm.stop()
        assert not helper_processes(str(runtime_root), str(share))
        assert not list(runtime_root.glob("vm-*"))
    finally:
        find.cache_clear()


NOTEBOOK_FULL = '''
nb = MNT / "nb"
nb.mkdir()
os.chmod(nb, 0o777)
guest = """
import errno, os
with open("kept.txt", "wb") as f:
    f.write(b"k" * 100000); f.flush(); os.fsync(f.fileno())
print("kept", flush=True)
try:
    with open("big.bin", "wb") as f:
        while True:
            f.write(b"z" * 65536); f.flush(); os.fsync(f.fileno())
except OSError as exc:
    print("ERR", exc.errno, exc.strerror, flush=True)
try:
    with open("small.txt", "w") as f:
        f.write("more"); f.flush(); os.fsync(f.fileno())
except OSError as exc:
    print("ERR2", exc.errno, flush=True)
os.remove("big.bin")
with open("after.txt", "w") as f:
    f.write("space again"); f.flush(); os.fsync(f.fileno())
print("done", flush=True)
"""
t0 = time.monotonic()
p = subprocess.run(CAPSEM + ["vm", "run", "--no-egress", "--memory", "512", "--cpus", "1", "--share", str(nb),
                             "--", "python3", "-c", guest], capture_output=True, text=True, timeout=600)
out = {"rc": p.returncode, "stdout": p.stdout, "stderr": p.stderr[-3000:], "s": time.monotonic() - t0,
       "kept": (nb / "kept.txt").read_bytes() == b"k" * 100000,
       "after": (nb / "after.txt").read_text() if (nb / "after.txt").exists() else None}
print(json.dumps(out))
'''


@pytest.mark.vm
def test_notebook_folder_full_is_enospc_in_the_guest_and_keeps_what_was_written(image_dir, runtime_root, tmp_path):
    code = f"CAPSEM = {CAPSEM!r}\n" + NOTEBOOK_FULL
    r = run_child(code, tmp_path / "mnt", size="4m", timeout=700)
    print(f"\nnotebook folder full: capsem vm run took {r['s']:.1f} s; guest said {r['stdout']!r}")
    assert r["rc"] == 0, r
    # the guest's write fails with the cause (ENOSPC), nothing hangs, the VM stays usable, what was
    # fsynced before is whole on the host, and writes work again once there is space
    assert "kept" in r["stdout"] and f"ERR {errno.ENOSPC} No space left on device" in r["stdout"], r
    assert r["kept"] and r["after"] == "space again" and "done" in r["stdout"]
    assert not helper_processes(str(runtime_root))


RUNTIME_FULL_VM = '''
rt = MNT / "rt"
rt.mkdir(mode=0o700)
fill(MNT / "filler")
env = dict(os.environ, CAPSEM_RUNTIME_DIR=str(rt))
p = subprocess.run(CAPSEM + ["vm", "run", "--no-egress", "--memory", "512", "--cpus", "1", "--", "true"],
                   capture_output=True, text=True, timeout=300, env=env)
print(json.dumps({"rc": p.returncode, "stderr": p.stderr[-3000:], "left": sorted(os.listdir(rt))}))
'''


@pytest.mark.vm
def test_runtime_dir_full_fails_capsem_vm_run_naming_it(image_dir, tmp_path):
    r = run_child(f"CAPSEM = {CAPSEM!r}\n" + RUNTIME_FULL_VM, tmp_path / "mnt", size="256k")
    assert r["rc"] != 0
    assert "cannot create the VM's runtime directory" in r["stderr"] and "CAPSEM_RUNTIME_DIR" in r["stderr"], r
    assert "Traceback" not in r["stderr"], r
    assert r["left"] == [], r
