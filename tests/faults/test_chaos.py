"""The chaos suite (issue 21): each host process of a running capsem kernel SIGKILLed at a seeded
random moment during a write+fsync loop with requests in flight (chaos_world.py says what a round
checks). One kernel for the module: the proxy fault leaves it working; each fault that kills the VM
is followed by a restart (a fresh VM) for the next round.

`make vm` runs one round per fault (CAPSEM_CHAOS_SEED, default 21); `make chaos` runs
CAPSEM_CHAOS_ROUNDS rounds per fault with a fresh seed (printed: rerun a failure with it)."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from chaos_world import Chaos, Fault, pids_named, revive, rounds, run_round, summary
from kernel_helpers import qemu_pid

from capsem_kernel import loop_thread

pytestmark = [pytest.mark.vm, pytest.mark.timeout(3600)]
KERNEL = "capsem-chaos"
CAPSEM_CLI = [sys.executable, "-m", "capsem_vm.cli"]

# the faults, one entry each; the order puts the fault the kernel survives first (it shares the first VM)
FAULTS = [
    Fault("proxy-worker", lambda c: list(c.world.runtime.service.pids), kills_kernel=False),
    Fault("vhost-device-vsock", lambda c: pids_named("vhost-device-vsock", c.runtime_root)[:1], kills_kernel=True,
          reason=lambda c: "vhost-device-vsock exited ("),
    # virtiofsd runs as two processes (the one capsem holds, its worker in a pid namespace): the worker
    # serves the guest's writes
    Fault("virtiofsd", lambda c: [max(pids_named("virtiofsd", str(c.nb)))], kills_kernel=True,
          reason=lambda c: f"virtiofsd for {c.nb} exited ("),
    Fault("qemu", lambda c: [qemu_pid(c.km)], kills_kernel=True),
]


@pytest.fixture(scope="module")
def chaos(image_dir, tmp_path_factory):
    from egress_world import World
    tmp = tmp_path_factory.mktemp("chaos")
    os.chmod(tmp, 0o755)
    mp = pytest.MonkeyPatch()
    w = loop_thread.run_sync(World.create(tmp), timeout=180)
    km = kc = None
    try:
        prefix = tmp / "prefix"
        proc = subprocess.run(CAPSEM_CLI + ["kernel", "install", "--prefix", str(prefix), "--name", KERNEL,
                                            "--policy", str(w.policy_file)], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        mp.setenv("JUPYTER_PATH", os.pathsep.join([str(prefix / "share" / "jupyter")]
                                                  + ([os.environ["JUPYTER_PATH"]] if os.environ.get("JUPYTER_PATH") else [])))
        (tmp / "rt").mkdir(mode=0o700)
        mp.setenv("CAPSEM_RUNTIME_DIR", str(tmp / "rt"))
        nb = tmp / "notebook"
        nb.mkdir()
        from jupyter_client.manager import start_new_kernel
        t0 = time.monotonic()
        km, kc = start_new_kernel(kernel_name=KERNEL, startup_timeout=900, cwd=str(nb))
        print(f"\nchaos: kernel started in {time.monotonic() - t0:.1f} s")
        c = Chaos(km=km, kc=kc, nb=nb, world=w, url=f"http://api.test.example:{w.HTTP}/echo/chaos")
        yield c
        print("\n" + summary(c.figures))
    finally:
        if km is not None:
            try:
                kc.stop_channels()
            finally:
                km.shutdown_kernel(now=True)
        loop_thread.run_sync(w.close(), timeout=60)
        mp.undo()
    from host_helpers import helper_processes
    assert not helper_processes(str(tmp)), helper_processes(str(tmp))


@pytest.mark.parametrize("fault", FAULTS, ids=[f.name for f in FAULTS])
def test_fault(chaos, fault):
    for index in range(rounds()):
        revive(chaos)
        run_round(chaos, fault, index)
