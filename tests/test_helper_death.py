"""A helper the VM cannot live without dies (issue 21): virtiofsd or the vsock backend, SIGKILLed
while the guest writes to the shared folder. The VM is declared dead within DEAD_BOUND s (TCG) with
a reason naming the helper, the guest's command does not leave its client waiting, and the VM and
every other helper are gone. Real VMs, real helpers; each test prints the time to report."""

import asyncio
import os
import signal
import subprocess
import time

import pytest

from capsem_vm.config import Share, VMConfig
from capsem_vm.errors import VMError
from capsem_vm.vm import VM

from host_helpers import CAPSEM, helper_processes

pytestmark = [pytest.mark.vm, pytest.mark.timeout(900)]

DEAD_BOUND = 5.0  # s from the SIGKILL to "dead, and why" (issue 21, under TCG)
GONE_BOUND = 15.0  # s until no process of the VM is left
# fsync each line: each write reaches virtiofsd (the write in flight when it dies must not hang us)
WRITER = ("import os, time\n"
          "f = open('log.txt', 'a')\n"
          "while True:\n"
          "    f.write('x' * 100 + '\\n'); f.flush(); os.fsync(f.fileno())\n")


def _pids(kind: str, *markers: str) -> list[int]:
    return [int(line.split()[0]) for line in helper_processes(*markers) if kind in line.split(" ", 2)[1]]


async def _until(cond, bound: float, what: str) -> float:
    t0 = time.monotonic()
    while not cond():
        assert time.monotonic() - t0 < bound, f"{what}: not within {bound} s"
        await asyncio.sleep(0.05)
    return time.monotonic() - t0


async def _wait_written(path, bound: float = 120.0) -> None:
    await _until(lambda: path.exists() and path.stat().st_size > 1000, bound, "the guest writes the share")


async def _drain(proc) -> None:
    async for _fd, _data in proc.output():
        pass


# virtiofsd runs as two processes (the one capsem holds, and its worker in a pid namespace): either dying counts
@pytest.mark.parametrize("helper,pick", [("virtiofsd", max), ("virtiofsd", min), ("vhost-device-vsock", max)],
                         ids=["virtiofsd-worker", "virtiofsd-held", "vhost-device-vsock"])
async def test_a_dead_helper_kills_the_vm_with_its_reason(image_dir, runtime_root, tmp_path, helper, pick):
    share = tmp_path / "nb"
    share.mkdir()
    events = []
    vm = VM(VMConfig(memory_mb=512, cpus=1, shares=(Share(share, "nb"),)))
    vm.on_event = events.append
    await vm.start()
    root = str(vm.paths.root)
    try:
        proc = await vm.control.exec(["python3", "-c", WRITER], cwd=str(share))
        output = asyncio.ensure_future(_drain(proc))
        await _wait_written(share / "log.txt")
        before = " ".join(helper_processes(root, str(share)))
        assert all(name in before for name in ("qemu-system", "virtiofsd", "vhost-device-vsock")), before
        marker = str(share) if helper == "virtiofsd" else root
        victims = _pids(helper, marker)
        assert victims, helper_processes()
        os.kill(pick(victims), signal.SIGKILL)
        t0 = time.monotonic()
        dead_s = await _until(lambda: vm.death_reason is not None and not vm.alive(), DEAD_BOUND,
                              f"{helper} killed, the VM still looks alive")
        print(f"\n{helper} SIGKILLed: VM reported dead in {dead_s:.3f} s: {vm.death_reason}")
        name = f"virtiofsd for {share}" if helper == "virtiofsd" else "vhost-device-vsock"
        assert vm.death_reason.startswith(name) and "exited (" in vm.death_reason
        assert [e["reason"] for e in events if e.get("t") == "vm_died"] == [vm.death_reason]
        # the guest's command in flight ends (with an error), its client does not wait forever
        with pytest.raises(VMError):
            await asyncio.wait_for(output, DEAD_BOUND)
        gone_s = await _until(lambda: not helper_processes(root, str(share)), GONE_BOUND, "VM processes left")
        print(f"no process of the VM left {time.monotonic() - t0:.3f} s after the kill (gone_s={gone_s:.3f})")
        await asyncio.wait_for(vm.stop(), 30)  # joins the teardown the death started
        assert not os.path.exists(root)
        assert (share / "log.txt").stat().st_size > 1000  # what was fsynced before is there
    finally:
        await vm.stop()
    assert not helper_processes(root, str(share))


def test_vm_run_exits_non_zero_naming_the_dead_helper(image_dir, runtime_root, tmp_path):
    share = tmp_path / "nb"
    share.mkdir()
    env = dict(os.environ)
    cli = subprocess.Popen(CAPSEM + ["vm", "run", "--no-egress", "--memory", "512", "--cpus", "1", "--share",
                                     str(share), "--", "python3", "-c", WRITER],
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, text=True)
    try:
        t_boot = time.monotonic()
        while not ((share / "log.txt").exists() and (share / "log.txt").stat().st_size > 1000):
            assert cli.poll() is None, cli.stderr.read()
            assert time.monotonic() - t_boot < 300, "the guest never wrote"
            time.sleep(0.1)
        victims = _pids("virtiofsd", str(share))
        os.kill(max(victims), signal.SIGKILL)
        t0 = time.monotonic()
        _, err = cli.communicate(timeout=60)
        exit_s = time.monotonic() - t0
        print(f"\ncapsem vm run exited {exit_s:.3f} s after virtiofsd was killed (code {cli.returncode})")
        assert cli.returncode not in (0, None)
        assert f"virtiofsd for {share} exited (" in err, err
        assert exit_s < DEAD_BOUND + GONE_BOUND
    finally:
        if cli.poll() is None:
            cli.kill()
            cli.wait()
    assert not helper_processes(str(share), str(runtime_root))


def test_kernel_with_a_dead_virtiofsd_is_dead_with_its_reason_and_restarts(capsem_kernelspecs, tmp_path):
    from kernel_helpers import qemu_pid, run_ok, start_kernel, stop_kernel, wait_gone
    km, kc = start_kernel(cwd=tmp_path)
    try:
        first_qemu = qemu_pid(km)
        root = km.provisioner.kernel_vm.info()["runtime_dir"]
        kc.execute(WRITER)  # runs until the VM dies: an execute request in flight
        t_boot = time.monotonic()
        while not ((tmp_path / "log.txt").exists() and (tmp_path / "log.txt").stat().st_size > 1000):
            assert time.monotonic() - t_boot < 120, "the kernel never wrote"
            time.sleep(0.1)
        os.kill(max(_pids("virtiofsd", str(tmp_path))), signal.SIGKILL)
        t0 = time.monotonic()
        while km.is_alive():
            assert time.monotonic() - t0 < DEAD_BOUND, "virtiofsd killed, the kernel still looks alive"
            time.sleep(0.05)
        dead_s = time.monotonic() - t0
        info = km.provisioner.kernel_vm.info()
        print(f"\nkernel reported dead {dead_s:.3f} s after virtiofsd was killed: {info['death_reason']}")
        assert info["state"] == "dead"
        assert info["death_reason"].startswith(f"virtiofsd for {tmp_path} exited (")
        import asyncio as _a
        assert _a.run(km.provisioner.poll()) is not None
        gone = time.monotonic()
        while helper_processes(root, str(tmp_path)):
            assert time.monotonic() - gone < GONE_BOUND, helper_processes(root, str(tmp_path))
            time.sleep(0.1)
        print(f"no process of the dead kernel's VM left {time.monotonic() - t0:.3f} s after the kill")
        km.restart_kernel(now=True)
        kc.wait_for_ready(timeout=300)
        assert qemu_pid(km) != first_qemu
        assert run_ok(kc, "print(open('log.txt').read(100) == 'x' * 100)") == "True\n"
        assert km.provisioner.kernel_vm.info()["death_reason"] is None
    finally:
        stop_kernel(km, kc)
    wait_gone(tmp_path, timeout=20)
