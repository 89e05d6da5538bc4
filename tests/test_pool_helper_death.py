"""A helper a claimed pooled VM cannot live without dies (issue 21): its keeper, its vsock backend
(the keeper's child), the virtiofsd hot-plugged for the claim (the claimer's child) or QEMU,
SIGKILLed while the kernel fsyncs into the notebook folder with an execute request in flight.
The kernel is reported dead within DEAD_BOUND s (TCG) with a reason naming the helper (what the
server extension shows: provisioner info), every process of the VM is gone, and a restart gives a
fresh VM. Real pool, real kernels through jupyter_client; each test prints its times.

One pool (2 x 512 MB, 1 CPU) for the module: a claim is refilled while the next test starts.
"""

from __future__ import annotations

import os
import signal
import time

import pytest

import kernel_helpers as kh
from host_helpers import helper_processes
from test_helper_death import DEAD_BOUND, GONE_BOUND, WRITER
from test_pool import capsem, start_kernel, start_pool, wait_ready

pytestmark = [pytest.mark.vm, pytest.mark.usefixtures("capsem_kernelspecs"), pytest.mark.timeout(1800)]


@pytest.fixture(scope="module")
def pool():
    st = start_pool()
    yield st
    capsem("pool", "stop")


def _pid_of(kind: str, *markers: str) -> int:
    pids = [int(line.split()[0]) for line in helper_processes(*markers) if kind in line.split(" ", 2)[1]]
    assert pids, f"no {kind} process of {markers}: {helper_processes()}"
    return max(pids)  # virtiofsd: its worker (either of its two processes dying counts: test_helper_death)


def _victim(fault: str, km, folder) -> int:
    vm = km.provisioner.kernel_vm.vm
    root = str(vm.paths.root)
    return {"keeper": lambda: vm.qemu.keeper_pid,
            "qemu": lambda: vm.qemu.pid,
            "vsock": lambda: _pid_of("vhost-device-vsock", root),
            "virtiofsd": lambda: _pid_of("virtiofsd", str(folder))}[fault]()


REASONS = {"keeper": "the pooled VM's keeper (pid ", "qemu": "QEMU exited (",
           "vsock": "vhost-device-vsock exited (", "virtiofsd": "virtiofsd for {folder} exited ("}


@pytest.mark.parametrize("fault", ["virtiofsd", "keeper", "vsock", "qemu"])
def test_a_dead_helper_of_a_claimed_vm_kills_the_kernel_with_its_reason(pool, tmp_path, fault):
    folder = tmp_path / "nb"
    folder.mkdir()
    wait_ready(1)
    km, kc = start_kernel(folder)
    try:
        kernel_vm = km.provisioner.kernel_vm
        assert kernel_vm.info()["pooled"], "the kernel did not get a pooled VM"
        vm = kernel_vm.vm
        root, keeper, qemu = str(vm.paths.root), vm.qemu.keeper_pid, vm.qemu.pid
        kc.execute(WRITER)  # runs until the VM dies: an execute request in flight
        log = folder / "log.txt"
        t_boot = time.monotonic()
        while not (log.exists() and log.stat().st_size > 1000):
            assert time.monotonic() - t_boot < 120, "the kernel never wrote into its folder"
            time.sleep(0.1)
        os.kill(_victim(fault, km, folder), signal.SIGKILL)
        t0 = time.monotonic()
        while km.is_alive() or kernel_vm.info()["death_reason"] is None:
            assert time.monotonic() - t0 < DEAD_BOUND, f"{fault} killed: {kernel_vm.info()}"
            time.sleep(0.02)
        dead_s = time.monotonic() - t0
        info = kernel_vm.info()
        print(f"\n{fault} SIGKILLed: pooled kernel reported dead in {dead_s:.3f} s: {info['death_reason']}")
        assert info["state"] == "dead"
        assert info["death_reason"].startswith(REASONS[fault].format(folder=folder)), info["death_reason"]
        while left := helper_processes(root, str(folder)) + [p for p in (keeper, qemu) if kh.pid_alive(p)]:
            assert time.monotonic() - t0 < GONE_BOUND, left
            time.sleep(0.1)
        print(f"no process of the dead pooled VM left {time.monotonic() - t0:.3f} s after the kill")
        if fault == "keeper":  # a restart gives a fresh VM (pooled or cold), and the folder kept what was fsynced
            km.restart_kernel(now=True)
            kc.wait_for_ready(timeout=kh.STARTUP_TIMEOUT)
            assert km.provisioner.kernel_vm.vm.qemu.pid != qemu
            assert kh.run_ok(kc, "print(open('log.txt').read(100) == 'x' * 100)") == "True\n"
            assert km.provisioner.kernel_vm.info()["death_reason"] is None
    finally:
        kh.stop_kernel(km, kc)
