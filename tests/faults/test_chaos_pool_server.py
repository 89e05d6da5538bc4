"""The chaos suite (issue 21), part two: the host processes of a kernel claimed from the warm pool
(its keeper, its vsock backend, the virtiofsd hot-plugged for the claim, its QEMU) and the Jupyter
server itself, each SIGKILLed at a seeded random moment during the write+fsync loop with requests in
flight (chaos_world.py: WORKLOAD, what a round checks).

One `capsem pool` (2 x 512 MB, 1 CPU) and one egress world for the module. The pooled faults run
through chaos_world.run_round against one KernelManager whose kernel is claimed from the pool; each
fault kills the VM, the next round restarts the kernel (a fresh claim). The server round runs a real
`jupyter server` owning a cold and a pooled capsem kernel, the workload on both through clients
connected to the kernels' ports, SIGKILLs the server at the drawn moment and checks: no VM, helper
or proxy of the server left within DEAD_BOUND s, the claimed VM killed (the pool does not get it
back), every acknowledged (fsynced) record on the host, and the next server start sweeps the
leftovers (the dead server's VM dirs).

`make vm` runs one round per fault (CAPSEM_CHAOS_SEED, default 21); `make chaos` runs
CAPSEM_CHAOS_ROUNDS rounds per fault with a fresh seed (printed: rerun a failure with it)."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from chaos_world import (DEAD_BOUND, DELAY, DURATION, RECORD_PAD, START_ACKS, WORKLOAD, Acks, Chaos, Fault,
                         _alive, _until, parse_records, pids_named, revive, rounds, run_round, seed, summary)
from host_helpers import helper_processes

from capsem_kernel import loop_thread

pytestmark = [pytest.mark.vm, pytest.mark.timeout(3600)]
POOLED = "capsem-chaos-pooled"
COLD = "capsem-chaos-cold"
CAPSEM_CLI = [sys.executable, "-m", "capsem_vm.cli"]
MEMORY, CPUS, SIZE = "512", "1", 2
FILL_TIMEOUT = 900.0


def _vm(c: Chaos):
    return c.kernel_vm.vm


# the faults of a claimed VM, one entry each; every one kills the kernel
POOL_FAULTS = [
    Fault("pool-keeper", lambda c: [_vm(c).qemu.keeper_pid], kills_kernel=True,
          reason=lambda c: "the pooled VM's keeper (pid "),
    Fault("pool-vhost-device-vsock", lambda c: pids_named("vhost-device-vsock", c.runtime_root)[:1],
          kills_kernel=True, reason=lambda c: "vhost-device-vsock exited ("),
    # the worker of the two virtiofsd processes serves the guest's writes (test_chaos.py)
    Fault("pool-virtiofsd", lambda c: [max(pids_named("virtiofsd", str(c.nb)))], kills_kernel=True,
          reason=lambda c: f"virtiofsd for {c.nb} exited ("),
    Fault("pool-qemu", lambda c: [_vm(c).qemu.pid], kills_kernel=True, reason=lambda c: "QEMU exited ("),
]


def _pool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(CAPSEM_CLI + ["pool", *args], capture_output=True, text=True, timeout=120)


def _pool_status() -> dict:
    out = _pool("status", "--json")
    assert out.returncode == 0, out.stdout + out.stderr
    return json.loads(out.stdout)


def _wait_ready(n: int = 1) -> dict:
    deadline = time.monotonic() + FILL_TIMEOUT
    while True:
        st = _pool_status()
        if sum(v["state"] == "ready" for v in st["vms"]) >= n:
            return st
        assert time.monotonic() < deadline, f"the pool did not get {n} VM(s) ready: {st}"
        time.sleep(0.5)


@pytest.fixture(scope="module")
def world_pool(image_dir, tmp_path_factory):
    """The egress world, both kernelspecs (pooled, cold) with its policy, a private runtime dir and
    a running pool: {"world", "tmp", "prefix", "rt"}."""
    from egress_world import World
    tmp = tmp_path_factory.mktemp("chaospool")
    os.chmod(tmp, 0o755)
    mp = pytest.MonkeyPatch()
    w = loop_thread.run_sync(World.create(tmp), timeout=180)
    try:
        prefix = tmp / "prefix"
        for name, extra in ((POOLED, ["--pool"]), (COLD, [])):
            proc = subprocess.run(CAPSEM_CLI + ["kernel", "install", "--prefix", str(prefix), "--name", name,
                                                "--policy", str(w.policy_file), "--memory", MEMORY, "--cpus", CPUS,
                                                *extra], capture_output=True, text=True, timeout=120)
            assert proc.returncode == 0, proc.stdout + proc.stderr
        mp.setenv("JUPYTER_PATH", os.pathsep.join([str(prefix / "share" / "jupyter")]
                                                  + ([os.environ["JUPYTER_PATH"]] if os.environ.get("JUPYTER_PATH") else [])))
        # short: the server test's sockets live under it too
        rt = Path("/tmp") / f"capsem-rt-chaospool-{os.getpid()}"
        rt.mkdir(mode=0o700)
        mp.setenv("CAPSEM_RUNTIME_DIR", str(rt))
        t0 = time.monotonic()
        out = _pool("start", "--size", str(SIZE), "--memory", MEMORY, "--cpus", CPUS)
        assert out.returncode == 0, out.stdout + out.stderr
        _wait_ready(1)
        print(f"\nchaos: pool has a ready VM after {time.monotonic() - t0:.1f} s")
        figures: dict = {}
        yield {"world": w, "tmp": tmp, "prefix": prefix, "rt": rt, "figures": figures}
        print("\n" + summary(figures))
    finally:
        _pool("stop")
        loop_thread.run_sync(w.close(), timeout=60)
        mp.undo()
    import shutil
    shutil.rmtree(rt, ignore_errors=True)
    assert not helper_processes(str(tmp)), helper_processes(str(tmp))


@pytest.fixture(scope="module")
def pooled_chaos(world_pool):
    w, tmp = world_pool["world"], world_pool["tmp"]
    nb = tmp / "notebook"
    nb.mkdir()
    km = kc = None
    try:
        from jupyter_client.manager import start_new_kernel
        t0 = time.monotonic()
        km, kc = start_new_kernel(kernel_name=POOLED, startup_timeout=900, cwd=str(nb))
        print(f"\nchaos: pooled kernel started in {time.monotonic() - t0:.1f} s")
        c = Chaos(km=km, kc=kc, nb=nb, world=w, url=f"http://api.test.example:{w.HTTP}/echo/chaos",
                  figures=world_pool["figures"])
        yield c
    finally:
        if km is not None:
            try:
                kc.stop_channels()
            finally:
                km.shutdown_kernel(now=True)


@pytest.mark.parametrize("fault", POOL_FAULTS, ids=[f.name for f in POOL_FAULTS])
def test_pooled_fault(pooled_chaos, fault):
    c = pooled_chaos
    for index in range(rounds()):
        if not c.km.is_alive():
            _wait_ready(1)  # the restart claims a fresh pooled VM (the pool refilled meanwhile)
            t0 = time.monotonic()
            revive(c)
            print(f"\nchaos: pooled kernel restarted in {time.monotonic() - t0:.1f} s")
        assert c.kernel_vm.info()["pooled"], "the kernel did not get a pooled VM"
        vm = _vm(c)
        keeper, qemu = vm.qemu.keeper_pid, vm.qemu.pid
        figures = run_round(c, fault, index)
        # the keeper and QEMU of a pooled VM are the pool's processes (run_round looks for the VM
        # dir's helpers): they are gone too
        assert _until(lambda: not any(_alive(p) for p in (keeper, qemu)), 10) is not None, (keeper, qemu)
        assert all(v["keeper_pid"] != keeper for v in _pool_status()["vms"]), "a dead claimed VM went back to the pool"
        print(f"chaos: {fault.name}: dead in {figures['dead_s']} s, reason {figures['reason']!r}")


# --- the Jupyter server ----------------------------------------------------------------------------

def _descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        try:
            kids = [int(k) for t in Path(f"/proc/{p}/task").iterdir() for k in (t / "children").read_text().split()]
        except OSError:
            continue
        out += kids
        todo += kids
    return out


def _owner_pid(vm_dir: Path) -> int:
    return int(vm_dir.joinpath("owner").read_text().split()[0])


def _client(server, kernel_id: str):
    """A client on the kernel's ports (its connection file in the server's runtime dir), once the
    server extension says its VM is ready."""
    from jupyter_client.blocking import BlockingKernelClient
    deadline = time.monotonic() + 600
    while (f := server.get(f"/capsem/kernels/{kernel_id}")[1])["state"] != "ready":
        assert time.monotonic() < deadline and f["state"] == "booting", f
        time.sleep(0.3)
    kc = BlockingKernelClient(connection_file=str(server.log_path.parent / "jupyter-runtime" / f"kernel-{kernel_id}.json"))
    kc.load_connection_file()
    # no heartbeat: without a KernelManager the client would take a late beat (TCG) for a dead kernel;
    # the server owns the kernel's liveness
    kc.start_channels(hb=False)
    kc.wait_for_ready(timeout=300)
    return kc


def test_server_sigkill(world_pool):
    """The Jupyter server SIGKILLed with a cold and a pooled kernel each in the workload."""
    from jupyter_helpers import start_server
    w, tmp, rt = world_pool["world"], world_pool["tmp"], world_pool["rt"]
    name, index = "jupyter-server", 0
    notebooks = tmp / "server-notebooks"
    notebooks.mkdir()
    env = {"JUPYTER_PATH": os.environ["JUPYTER_PATH"], "CAPSEM_RUNTIME_DIR": str(rt)}
    url = f"http://api.test.example:{w.HTTP}/echo/chaos"  # the server's own proxy cannot resolve it: refused, in flight
    for index in range(rounds()):
        rng = random.Random(f"{seed()}:{name}:{index}")
        delay = rng.uniform(*DELAY)
        print(f"\nchaos round: fault={name} round={index} seed={seed()} (CAPSEM_CHAOS_SEED) delay={delay:.3f} s")
        st = _wait_ready(1)
        keeper = next(v["keeper_pid"] for v in st["vms"] if v["state"] == "ready")  # the pooled kernel's claim
        pool_pid = st["pid"]
        t0 = time.monotonic()
        server = start_server(tmp / f"server-{index}", root_dir=notebooks, env=env)
        clients, acks = {}, {}
        try:
            ids = {}
            for kind, spec in (("pooled", POOLED), ("cold", COLD)):
                status, body = server.request("POST", "/api/kernels", {"name": spec}, timeout=600)
                assert status == 201, (body, server.log()[-4000:])
                ids[kind] = body["id"]
            for kind, kid in ids.items():
                clients[kind] = _client(server, kid)
            print(f"chaos: server and its two kernels ready in {time.monotonic() - t0:.1f} s")
            assert all(v["keeper_pid"] != keeper for v in _pool_status()["vms"]), "the pooled kernel claimed no VM"
            owners = {_owner_pid(d): d for d in rt.glob("vm-*") if (d / "owner").exists()}
            dirs = {"pooled": owners[keeper], "cold": owners[server.proc.pid]}
            records = {kind: notebooks / f"chaos-{name}-{kind}-{index}.log" for kind in ids}
            for kind, kc in clients.items():
                code = WORKLOAD.format(duration=DURATION + delay + START_ACKS * 0.2 + 20, url=url,
                                       file=records[kind].name, start=0, pad=RECORD_PAD)
                acks[kind] = Acks(kc, kc.execute(code))
            started = _until(lambda: all(len(a.acked) >= START_ACKS or a.idle.is_set() for a in acks.values()), 300)
            assert started is not None and not any(a.idle.is_set() for a in acks.values()), \
                f"the workload never ran: {[a.error for a in acks.values()]}"
            time.sleep(delay)
            markers = (str(dirs["cold"]), str(dirs["pooled"]), str(notebooks))
            ours = set(_descendants(server.proc.pid) + [keeper]
                       + [int(line.split()[0]) for line in helper_processes(*markers)])
            acked_before = {k: len(a.acked) for k, a in acks.items()}
            server.proc.send_signal(signal.SIGKILL)
            t_kill = time.monotonic()
            server.proc.wait()
            left = lambda: [p for p in ours if _alive(p)] + helper_processes(*markers)  # noqa: E731
            gone_s = _until(lambda: not left(), DEAD_BOUND)
            assert gone_s is not None, f"left {DEAD_BOUND} s after the server's SIGKILL: {left()}"
            figures = {"fault": name, "round": index, "seed": seed(), "delay": round(delay, 3),
                       "acked_before": acked_before, "gone_s": round(time.monotonic() - t_kill, 3)}
            st = _pool_status()
            assert st["pid"] == pool_pid and all(v["keeper_pid"] != keeper for v in st["vms"]), \
                f"the claimed VM went back to the pool: {st}"
            time.sleep(0.5)
        finally:
            for a in acks.values():
                a.stop()
            for kc in clients.values():
                kc.stop_channels()
            if server.proc.poll() is None:
                server.stop()
        for kind, a in acks.items():
            on_host = parse_records(records[kind].read_bytes() if records[kind].exists() else b"")
            lost = [s for s in a.acked if not on_host.get(s)]
            assert not lost, f"{kind}: {len(lost)} acknowledged (fsynced) records lost or torn, e.g. {lost[:5]}"
        figures["acked"] = {k: len(a.acked) for k, a in acks.items()}
        # the next start sweeps the dead server's VM dirs (its cold VM's; the pooled one's went with its keeper)
        t1 = time.monotonic()
        server = start_server(tmp / f"server-{index}-next", root_dir=notebooks, env=env)
        try:
            swept_s = _until(lambda: not dirs["cold"].exists() and not dirs["pooled"].exists(), 10)
            assert swept_s is not None, [p.name for p in rt.glob("vm-*")]
            figures["sweep_s"] = round(time.monotonic() - t1, 3)  # from the new server's start
            assert _pool_status()["pid"] == pool_pid, "the sweep touched the live pool"
        finally:
            server.stop()
        world_pool["figures"].setdefault(name, []).append(figures)
        print(f"chaos round result: {json.dumps(figures, default=str)}")
