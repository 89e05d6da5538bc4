"""The capsem kernel's lifecycle with real VMs: interrupt, restart, death, parallel kernels, shares.

Each test boots its own VM(s) (one kernel per test; the jupyter_client managers are the ones the
front ends use: a blocking KernelManager like jupyter_console/nbclient, AsyncIOLoopKernelManager
with its restarter like jupyter_server).
"""

import asyncio
import os
import signal
import time

import pytest
from jupyter_client import AsyncKernelManager, BlockingKernelClient
from jupyter_client.ioloop import AsyncIOLoopKernelManager

from kernel_helpers import (KERNEL, KERNEL_RO, STARTUP_TIMEOUT, collect, pid_alive, qemu_pid, run_ok, start_kernel,
                            stop_kernel, wait_gone)

pytestmark = [pytest.mark.vm, pytest.mark.timeout(1800)]  # boots under a loaded TCG host take minutes


def in_thread(fn, *args):
    """Run a blocking jupyter_client call on a worker thread. Not asyncio.to_thread: that copies
    this context into the thread, and with it jupyter_core's event-loop context variable, so two
    threads (or a thread and an earlier test's sync call) would share one loop ("This event loop
    is already running")."""
    return asyncio.get_running_loop().run_in_executor(None, fn, *args)


def blocking_client(km) -> BlockingKernelClient:
    """A blocking client (usable from a thread) of an async manager. Its parent is the manager, so
    it asks the manager whether the kernel lives: a parentless client judges by the heartbeat, and
    a kernel that is still starting (no heartbeat reply within 1 s) counts as dead to it."""
    kc = BlockingKernelClient(parent=km)
    kc.load_connection_info(km.get_connection_info())
    kc.start_channels()
    return kc


def test_interrupt_and_restart_gives_a_fresh_vm(capsem_kernelspecs, tmp_path):
    km, kc = start_kernel(cwd=tmp_path)
    try:
        first_qemu = qemu_pid(km)
        assert run_ok(kc, "import os; x = 42; open('/tmp/marker', 'w').write('1'); print(os.getcwd())") \
            == f"{tmp_path}\n"

        # Message-mode interrupt of a busy loop: KeyboardInterrupt, and the kernel lives on.
        msg_id = kc.execute("while True: pass")
        deadline = time.monotonic() + 60
        while True:  # wait until the loop is really running
            msg = kc.get_iopub_msg(timeout=max(0.1, deadline - time.monotonic()))
            if msg["parent_header"].get("msg_id") == msg_id and msg["msg_type"] == "execute_input":
                break
        time.sleep(1.0)
        t0 = time.monotonic()
        km.interrupt_kernel()
        reply, outputs = collect(kc, msg_id, timeout=60)
        interrupt_s = time.monotonic() - t0
        assert reply["content"]["status"] == "error"
        assert reply["content"]["ename"] == "KeyboardInterrupt"
        assert [m["content"]["ename"] for m in outputs if m["msg_type"] == "error"] == ["KeyboardInterrupt"]
        assert km.is_alive()
        assert run_ok(kc, "print(x)") == "42\n"
        print(f"interrupt took {interrupt_s:.2f} s")

        # Restart: a fresh VM, nothing survives (variables, files in the guest's /tmp). The same
        # client keeps working: the ports stay, ZMQ reconnects through the new VM's relay.
        km.restart_kernel()
        kc.wait_for_ready(timeout=STARTUP_TIMEOUT)
        second_qemu = qemu_pid(km)
        assert second_qemu != first_qemu and not pid_alive(first_qemu)
        assert run_ok(kc, "import os; print('x' in dir(), os.path.exists('/tmp/marker'), os.getcwd())") \
            == f"False False {tmp_path}\n"
        assert km.is_alive()
    finally:
        stop_kernel(km, kc)
    wait_gone(tmp_path, timeout=20)


async def test_guest_kernel_death_is_restarted_and_vm_death_is_reported(capsem_kernelspecs, tmp_path):
    # What jupyter_server uses: AsyncIOLoopKernelManager + AsyncIOLoopKernelRestarter.
    km = AsyncIOLoopKernelManager(kernel_name=KERNEL)
    await km.start_kernel(cwd=str(tmp_path))
    restarts, deaths = [], []
    km.add_restart_callback(lambda: restarts.append(time.monotonic()), "restart")
    km.add_restart_callback(lambda: deaths.append(time.monotonic()), "dead")
    kc = blocking_client(km)
    try:
        await in_thread(kc.wait_for_ready, STARTUP_TIMEOUT)
        first_qemu = qemu_pid(km)
        assert await in_thread(run_ok, kc, "import os; print(os.getpid())")

        # The guest kernel dies: poll() reports its exit code, the restarter restarts it.
        kc.execute("import os; os._exit(1)")
        t0 = time.monotonic()
        while not restarts:
            assert time.monotonic() - t0 < 30, "the restarter did not notice the dead kernel"
            await asyncio.sleep(0.2)
        detect_s = restarts[0] - t0
        # While the new VM boots, the kernel counts as alive (poll() is None), else the restarter
        # would restart it again and again.
        while qemu_pid(km) in (None, first_qemu) or km.provisioner.kernel_vm.ready_at is None:
            assert await km.is_alive() or qemu_pid(km) == first_qemu, "restarting kernel reported dead"
            assert time.monotonic() - t0 < STARTUP_TIMEOUT, "no restarted kernel"
            await asyncio.sleep(0.5)
        kc.stop_channels()
        kc = blocking_client(km)  # the restarter may pick new ports: reconnect from the new info
        await in_thread(kc.wait_for_ready, STARTUP_TIMEOUT)
        assert await in_thread(run_ok, kc, "print('x' in dir())") == "False\n"
        assert not pid_alive(first_qemu)
        assert len(restarts) == 1 and not deaths
        print(f"kernel death detected in {detect_s:.1f} s; restarted in {time.monotonic() - t0:.1f} s")

        # The VM dies (QEMU SIGKILLed): a dead kernel within seconds, never a hang.
        km.stop_restarter()
        qemu = qemu_pid(km)
        os.kill(qemu, signal.SIGKILL)
        t0 = time.monotonic()
        while await km.is_alive():
            assert time.monotonic() - t0 < 10, "QEMU killed but the kernel still looks alive"
            await asyncio.sleep(0.1)
        assert await km.provisioner.poll() is not None
        print(f"VM death detected in {time.monotonic() - t0:.2f} s")
        t0 = time.monotonic()
        await asyncio.wait_for(km.shutdown_kernel(), 30)
        assert time.monotonic() - t0 < 30
    finally:
        kc.stop_channels()
        if km.has_kernel:
            await km.shutdown_kernel(now=True)
    wait_gone(tmp_path, timeout=20)


async def test_two_kernels_on_the_same_folder(capsem_kernelspecs, tmp_path):
    kms = [AsyncKernelManager(kernel_name=KERNEL) for _ in range(2)]
    kcs = []
    try:
        await asyncio.gather(*(km.start_kernel(cwd=str(tmp_path)) for km in kms))
        kcs = [blocking_client(km) for km in kms]
        await asyncio.gather(*(in_thread(kc.wait_for_ready, STARTUP_TIMEOUT) for kc in kcs))
        assert qemu_pid(kms[0]) != qemu_pid(kms[1])
        for i, kc in enumerate(kcs):
            await in_thread(run_ok, kc, f"open('from_{i}.txt', 'w').write('kernel {i}')")
        for i, kc in enumerate(kcs):
            other = 1 - i
            out = await in_thread(run_ok, kc, f"print(open('from_{other}.txt').read())")
            assert out == f"kernel {other}\n"
        assert sorted(p.name for p in tmp_path.iterdir()) == ["from_0.txt", "from_1.txt"]
    finally:
        for kc in kcs:
            kc.stop_channels()
        await asyncio.gather(*(km.shutdown_kernel(now=True) for km in kms if km.has_kernel))
    wait_gone(tmp_path, timeout=20)


def test_read_only_share_refuses_writes(capsem_kernelspecs, tmp_path):
    (tmp_path / "data.txt").write_text("from the host")
    km, kc = start_kernel(KERNEL_RO, cwd=tmp_path)
    try:
        assert km.provisioner.share_mode == "ro"
        out = run_ok(kc, (
            "import errno, os\n"
            "print(open('data.txt').read())\n"
            "for attempt in (lambda: open('new.txt', 'w'), lambda: open('data.txt', 'a'),\n"
            "                lambda: os.remove('data.txt'), lambda: os.mkdir('d')):\n"
            "    try:\n"
            "        attempt()\n"
            "        print('written')\n"
            "    except OSError as e:\n"
            "        print(errno.errorcode[e.errno])\n"))
        assert out.splitlines()[0] == "from the host"
        assert out.splitlines()[1:] == ["EROFS"] * 4
        assert sorted(p.name for p in tmp_path.iterdir()) == ["data.txt"]
        assert (tmp_path / "data.txt").read_text() == "from the host"
    finally:
        stop_kernel(km, kc)
    wait_gone(tmp_path, timeout=20)
