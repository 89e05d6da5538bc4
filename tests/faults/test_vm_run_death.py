"""`capsem vm run` exits non-zero naming the helper for every helper death (issue 21): QEMU and the
vsock backend, SIGKILLed while the guest fsyncs into the shared folder (virtiofsd: in
tests/test_helper_death.py). Real VMs; each case prints the time from the kill to the exit."""

import os
import signal
import subprocess
import time

import pytest

from host_helpers import CAPSEM, helper_processes
from test_helper_death import WRITER

pytestmark = [pytest.mark.vm, pytest.mark.timeout(900)]

EXIT_BOUND = 20.0  # s from the kill to the CLI's exit (dead in < 5 s, then the teardown)



@pytest.mark.parametrize("kind,reason", [("qemu-system", "QEMU exited ("),
                                         ("vhost-device-vsock", "vhost-device-vsock exited (")],
                         ids=["qemu", "vhost-device-vsock"])
def test_vm_run_exits_non_zero_naming_the_dead_helper(image_dir, runtime_root, tmp_path, kind, reason):
    share = tmp_path / "nb"
    share.mkdir()
    cli = subprocess.Popen(CAPSEM + ["vm", "run", "--no-egress", "--memory", "512", "--cpus", "1", "--share",
                                     str(share), "--", "python3", "-c", WRITER],
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        t_boot = time.monotonic()
        while not ((share / "log.txt").exists() and (share / "log.txt").stat().st_size > 1000):
            assert cli.poll() is None, cli.stderr.read()
            assert time.monotonic() - t_boot < 300, "the guest never wrote"
            time.sleep(0.1)
        victims = [int(line.split()[0]) for line in helper_processes(str(runtime_root))
                   if kind in line.split(" ", 2)[1]]
        assert victims, helper_processes()
        os.kill(max(victims), signal.SIGKILL)
        t0 = time.monotonic()
        _, err = cli.communicate(timeout=60)
        exit_s = time.monotonic() - t0
        print(f"\ncapsem vm run exited {exit_s:.3f} s after {kind} was killed (code {cli.returncode})")
        assert cli.returncode not in (0, None)
        assert f"the VM died: {reason}" in err, err
        assert exit_s < EXIT_BOUND
    finally:
        if cli.poll() is None:
            cli.kill()
            cli.wait()
    assert not helper_processes(str(share), str(runtime_root))
