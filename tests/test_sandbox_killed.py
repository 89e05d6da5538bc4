"""A Sandbox's VM dies with the process that owns it: SIGKILL the owner (no close(), no atexit)
and nothing of the VM is left (QEMU, vsock backend, virtiofsd)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from host_helpers import helper_processes

pytestmark = pytest.mark.vm

OWNER = """
import sys
from capsem_kernel import Sandbox
sb = Sandbox(folder=sys.argv[1], use_pool=False)
assert sb.run_code("6 * 7").text == "42"
print("ready", flush=True)
sys.stdin.read()  # until killed
"""


def test_killed_owner_leaves_no_vm(image_dir, tmp_path):
    rt = tmp_path / "rt"
    rt.mkdir(mode=0o700)
    folder = tmp_path / "work"
    folder.mkdir()
    os.chmod(folder, 0o755)
    env = {**os.environ, "CAPSEM_RUNTIME_DIR": str(rt), "CAPSEM_DATA_DIR": str(tmp_path / "data"),
           "CAPSEM_CONFIG_DIR": str(tmp_path / "config")}
    owner = subprocess.Popen([sys.executable, "-c", OWNER, str(folder)], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    try:
        assert owner.stdout.readline().strip() == "ready"
        assert helper_processes(str(rt)) and helper_processes(str(folder))  # the VM runs
    finally:
        owner.send_signal(signal.SIGKILL)
        owner.wait(30)
    deadline = time.monotonic() + 30
    while left := helper_processes(str(rt), str(folder)):
        assert time.monotonic() < deadline, f"VM processes outlived their killed owner: {left}"
        time.sleep(0.2)
