"""`jupyter console --kernel capsem` driven through a pseudo-terminal: run code, Ctrl-C a busy loop
(KeyboardInterrupt, the kernel lives on), exit; the VM is gone afterwards."""

import os
import time

import pexpect
import pytest

from kernel_helpers import BIN, STARTUP_TIMEOUT, vm_processes, wait_gone

pytestmark = [pytest.mark.vm, pytest.mark.timeout(1200)]


def test_jupyter_console_run_interrupt_exit(capsem_kernelspecs, tmp_path):
    # --simple-prompt: plain line input instead of prompt_toolkit's escape sequences (the same
    # console, kernel client and SIGINT handling; what jupyter_console's own pty tests use).
    child = pexpect.spawn(str(BIN / "jupyter"), [
        "console", "--kernel", "capsem", "--simple-prompt",
        f"--ZMQTerminalInteractiveShell.kernel_timeout={STARTUP_TIMEOUT}"],
        cwd=str(tmp_path), env=dict(os.environ, TERM="xterm"), encoding="utf-8", codec_errors="replace",
        timeout=60, dimensions=(40, 200))
    try:
        t0 = time.monotonic()
        child.expect(r"In \[1\]: ", timeout=STARTUP_TIMEOUT + 60)
        started = time.monotonic() - t0
        assert vm_processes(tmp_path), "no virtiofsd for the notebook folder: not a capsem kernel?"

        child.sendline("import os; print('answer', 6 * 7, os.getcwd())")
        child.expect(f"answer 42 {tmp_path}", timeout=120)
        child.expect(r"In \[2\]: ", timeout=60)

        child.sendline("n = 0")
        child.expect(r"In \[3\]: ", timeout=120)
        child.sendline("while True: n += 1")
        time.sleep(3)  # let the loop run
        for _ in range(8):  # a slow guest may not have started the loop yet: Ctrl-C again
            child.sendintr()
            if child.expect(["KeyboardInterrupt", pexpect.TIMEOUT], timeout=15) == 0:
                break
        else:
            raise AssertionError(f"Ctrl-C did not interrupt the kernel: {child.before[-2000:]}")
        child.expect(r"In \[\d+\]: ", timeout=60)
        child.sendline("print('alive', n > 0)")
        child.expect("alive True", timeout=120)
        child.expect(r"In \[\d+\]: ", timeout=60)

        child.sendline("exit")
        child.expect(pexpect.EOF, timeout=120)
    finally:
        if child.isalive():
            child.terminate(force=True)
    child.close()
    assert child.exitstatus == 0, child.before
    assert wait_gone(tmp_path, timeout=30) < 30
    assert not vm_processes()
    print(f"console ready in {started:.1f} s")
