"""The Jupyter server dies (SIGKILL) (issue 21): no VM of it (cold or claimed from the pool), no
helper and no proxy service outlives it by more than GONE_BOUND s, and the next server start sweeps
what is left (capsem_vm/sweep.py) without touching another live owner's VM or a process whose pid
merely looks like a recorded one.

The unit tests plant leftovers (real processes, real dirs); the VM test runs a real `jupyter server`
with a pooled and a cold capsem kernel and a real pool, SIGKILLs the server, and starts it again.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from capsem_vm import runtime, sweep
from host_helpers import CAPSEM, helper_processes
from test_server_ext_vm import POLICY

GONE_BOUND = 5.0  # s after the server's SIGKILL until none of its processes is left (issue 21)


def _dead_pid() -> tuple[int, str]:
    """A pid and start time of a process that has exited (its owner identity, now stale)."""
    p = subprocess.Popen(["sleep", "30"])
    start = runtime._start_time(p.pid)
    p.kill()
    p.wait()
    return p.pid, start


def _alive(p: subprocess.Popen) -> bool:
    return p.poll() is None


@pytest.fixture
def fresh_sweep(monkeypatch):
    monkeypatch.setattr(sweep, "_swept", False)


def test_sweep_kills_a_dead_owners_helpers_never_a_reused_pid_nor_a_live_owners_vm(runtime_root, fresh_sweep):
    owner = _dead_pid()
    helper = subprocess.Popen(["sleep", "300"])  # a helper that outlived its owner
    unrelated = subprocess.Popen(["sleep", "300"])  # the pid of a recorded helper, reused by someone else
    live_helper = subprocess.Popen(["sleep", "300"])
    try:
        stale = runtime.create_vm_dir()
        stale.owner.write_text(f"{owner[0]} {owner[1]}\n")
        stale.pids.write_text(f"{helper.pid} {runtime._start_time(helper.pid)}\n"
                              f"{unrelated.pid} {int(runtime._start_time(unrelated.pid)) - 7}\n")
        (stale.root / "vsock.sock").touch()
        live = runtime.create_vm_dir()  # this process owns it: another live owner's VM
        runtime.record_pids(live, [live_helper])
        sweep.sweep_once()
        assert helper.wait(timeout=10) == -signal.SIGKILL
        assert not stale.root.exists()
        assert _alive(unrelated) and _alive(live_helper) and live.root.exists() and live.pids.exists()
        sweep.sweep_once()  # once per process: a second call does nothing
        assert live.root.exists()
    finally:
        for p in (helper, unrelated, live_helper):
            p.kill()
            p.wait()


def _pool_files(root: Path) -> tuple[Path, Path]:
    pool = root / "pool"
    pool.mkdir(mode=0o700, exist_ok=True)
    return pool / "pool.sock", pool / "pool.pid"


def _bound_socket(path: Path, listening: bool) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    s.bind(str(path))
    if listening:
        s.listen(1)
    return s


def test_sweep_removes_a_dead_pools_socket_and_pid_file_only(runtime_root, fresh_sweep):
    sock, pid_file = _pool_files(runtime_root)
    # a pool killed by SIGKILL: its socket answers nobody, its pid is gone
    _bound_socket(sock, listening=False).close()
    dead = _dead_pid()
    pid_file.write_text(f"{dead[0]} {dead[1]}\n")
    assert sweep.sweep() == {"vm_dirs": 0, "pool_files": 2, "proxy_logs": 0}
    assert not sock.exists() and not pid_file.exists()
    # a live pool that does not answer this instant (its pid and start time match): kept
    s = _bound_socket(sock, listening=False)
    pid_file.write_text(f"{os.getpid()} {runtime._start_time(os.getpid())}\n")
    try:
        assert sweep.sweep()["pool_files"] == 0 and sock.exists()
        # a pid file naming a live pid with another start time (reused) does not keep a dead pool's files
        pid_file.write_text(f"{os.getpid()} 1\n")
        assert sweep.sweep()["pool_files"] == 2
    finally:
        s.close()
    # a pool that answers: kept, whatever its pid file says
    with _bound_socket(sock, listening=True):
        pid_file.write_text(f"{dead[0]} {dead[1]}\n")
        assert sweep.sweep()["pool_files"] == 0 and sock.exists()


def test_sweep_keeps_the_newest_proxy_logs_of_gone_owners_and_every_live_ones(runtime_root, fresh_sweep):
    dead_pids = []
    for _ in range(sweep.KEEP_PROXY_LOGS + 3):
        dead_pids.append(_dead_pid()[0])
    for age, pid in enumerate(dead_pids):  # the first is the newest
        log = runtime_root / f"proxy-{pid}.log"
        log.write_text("worker log\n")
        os.utime(log, (time.time() - 60 * age, time.time() - 60 * age))
    live = runtime_root / f"proxy-{os.getpid()}.log"
    live.write_text("ours\n")
    os.utime(live, (0, 0))  # old, but its owner lives
    other = runtime_root / "proxy-notes.log"  # not a proxy log name: never touched
    other.write_text("x")
    target = runtime_root / "elsewhere.txt"
    target.write_text("keep me")
    link = runtime_root / f"proxy-{dead_pids[-1] + 100000}.log"  # a symlink in a log's name
    link.symlink_to(target)
    assert sweep.sweep()["proxy_logs"] == 3
    kept = {p.name for p in runtime_root.glob("proxy-*.log")}
    assert kept == {f"proxy-{pid}.log" for pid in dead_pids[:sweep.KEEP_PROXY_LOGS]} | {
        live.name, other.name, link.name}
    assert target.read_text() == "keep me"
    assert sweep.sweep()["proxy_logs"] == 0


def test_sweep_once_never_raises(runtime_root, fresh_sweep, monkeypatch, caplog):
    def broken() -> int:
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(runtime, "sweep_stale", broken)
    sweep.sweep_once()
    assert "sweeping the runtime dir failed" in caplog.text


# --- a real server, SIGKILLed ------------------------------------------------------------------




def _children(pid: int) -> list[int]:
    """Every live descendant of `pid` (proxy service, helpers)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        try:
            kids = [int(k) for t in Path(f"/proc/{p}/task").iterdir()
                    for k in (t / "children").read_text().split()]
        except OSError:
            continue
        out += kids
        todo += kids
    return out


def _live(pids) -> list[str]:
    import kernel_helpers as kh
    found = []
    for p in pids:
        if kh.pid_alive(p):
            try:
                cmd = Path(f"/proc/{p}/cmdline").read_bytes().replace(b"\0", b" ")[:200]
                found.append(f"{p} {cmd.decode(errors='replace')}")
            except OSError:
                pass
    return found


def _owner_pid(vm_dir: Path) -> int:
    return int(vm_dir.joinpath("owner").read_text().split()[0])


@pytest.mark.vm
@pytest.mark.timeout(1500)
def test_server_sigkill_leaves_nothing_and_the_next_start_sweeps(tmp_path, image_dir):
    from jupyter_helpers import start_server
    policy = tmp_path / "policy.toml"
    policy.write_text(POLICY)
    policy.chmod(0o600)
    prefix = tmp_path / "prefix"
    subprocess.run([*CAPSEM, "kernel", "install", "--prefix", str(prefix), "--name", "capsem-srvdeath",
                    "--policy", str(policy), "--memory", "512", "--cpus", "1", "--pool"],
                   check=True, capture_output=True, timeout=120)
    notebooks = tmp_path / "notebooks"
    notebooks.mkdir()
    rt = Path("/tmp") / f"capsem-rt-srvdeath-{os.getpid()}"
    rt.mkdir(mode=0o700)
    env = {"JUPYTER_PATH": str(prefix / "share" / "jupyter"), "CAPSEM_RUNTIME_DIR": str(rt)}
    penv = {**os.environ, "CAPSEM_RUNTIME_DIR": str(rt)}

    def pool(*args):
        return subprocess.run([*CAPSEM, "pool", *args], capture_output=True, text=True, timeout=120, env=penv)

    assert pool("start", "--size", "1", "--memory", "512", "--cpus", "1").returncode == 0
    server = None
    try:
        deadline = time.monotonic() + 900
        while not any(v["state"] == "ready" for v in json.loads(pool("status", "--json").stdout)["vms"]):
            assert time.monotonic() < deadline, "the pool never got a VM ready"
            time.sleep(1)
        keeper = next(v["keeper_pid"] for v in json.loads(pool("status", "--json").stdout)["vms"]
                      if v["state"] == "ready")  # the VM the first kernel claims
        server = start_server(tmp_path / "s1", root_dir=notebooks, env=env)
        kernels = {}
        for kind in ("pooled", "cold"):  # the pool's one VM goes to the first; the second boots cold
            status, body = server.request("POST", "/api/kernels", {"name": "capsem-srvdeath"}, timeout=600)
            assert status == 201, (body, server.log()[-4000:])
            kernels[kind] = body["id"]
        for kind, kid in kernels.items():
            deadline = time.monotonic() + 600
            while (f := server.get(f"/capsem/kernels/{kid}")[1])["state"] != "ready":
                assert time.monotonic() < deadline and f["state"] == "booting", f
                time.sleep(0.5)
        owners = {_owner_pid(d): d for d in rt.glob("vm-*")}
        dirs = {"pooled": owners[keeper], "cold": owners[server.proc.pid]}
        st = json.loads(pool("status", "--json").stdout)
        pool_pid = st["pid"]
        assert all(v["keeper_pid"] != keeper for v in st["vms"]), "the first kernel did not claim the pooled VM"
        markers = (str(dirs["cold"]), str(dirs["pooled"]), str(notebooks))
        ours = _children(server.proc.pid) + [keeper] + [int(line.split()[0]) for line in helper_processes(*markers)]
        assert any("capsem_vm.proxy.server" in line for line in _live(ours)), _live(ours)  # the proxy service runs
        assert len(helper_processes(str(dirs["pooled"]))) >= 2 and len(helper_processes(str(dirs["cold"]))) >= 2

        server.proc.kill()  # SIGKILL
        t0 = time.monotonic()
        server.proc.wait()
        while left := _live(ours) + helper_processes(*markers):
            assert time.monotonic() - t0 < GONE_BOUND, f"left {GONE_BOUND} s after the server's SIGKILL: {left}"
            time.sleep(0.05)
        gone_s = time.monotonic() - t0
        print(f"\nno VM, helper or proxy of the SIGKILLed server left after {gone_s:.3f} s")
        # the claimed VM was killed, not returned: the pool serves none of it, and lives on
        st = json.loads(pool("status", "--json").stdout)
        assert st["pid"] == pool_pid and all(v["keeper_pid"] != keeper for v in st["vms"])

        # leftovers: the cold VM's dir (its owner, the server, is dead), plus a planted dir whose
        # recorded helper still runs, next to a live owner's VM dir (the pool's VMs')
        assert dirs["cold"].exists()
        planted = rt / "vm-deadbeef"
        planted.mkdir(mode=0o700)
        dead = _dead_pid()
        (planted / "owner").write_text(f"{dead[0]} {dead[1]}\n")
        survivor = subprocess.Popen(["sleep", "300"])
        reused = subprocess.Popen(["sleep", "300"])
        (planted / "pids").write_text(f"{survivor.pid} {runtime._start_time(survivor.pid)}\n"
                                      f"{reused.pid} {int(runtime._start_time(reused.pid)) + 3}\n")
        pool_dirs = {d for d in rt.glob("vm-*") if d not in (dirs["cold"], planted)}
        try:
            server = start_server(tmp_path / "s2", root_dir=notebooks, env=env)
            assert survivor.wait(timeout=10) == -signal.SIGKILL
            assert not planted.exists() and not dirs["cold"].exists()
            assert reused.poll() is None, "a process whose pid was merely reused was killed"
            assert all(d.exists() for d in pool_dirs if _owner_alive(d)), pool_dirs
            assert json.loads(pool("status", "--json").stdout)["pid"] == pool_pid
        finally:
            for p in (survivor, reused):
                p.kill()
                p.wait()
    finally:
        if server is not None:
            server.stop()
        pool("stop")
        import shutil
        shutil.rmtree(rt, ignore_errors=True)


def _owner_alive(vm_dir: Path) -> bool:
    pairs = runtime._read_pairs(vm_dir / "owner")
    return bool(pairs) and runtime._alive(*pairs[0])
