"""Host trouble without touching the host (no tests here): run a Python child in a mount namespace
of its own (`unshare -m`, private propagation) with a small tmpfs mounted where the test says, so
"the file system is full" is a real full file system that only that child (and the processes it
starts: capsem, virtiofsd, QEMU) can see. The real disk is never filled.

The child's code sees `MNT` (a Path, the tmpfs) and `fill(path)` (write until ENOSPC) and prints
one JSON object as its last stdout line; `run_child` returns it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

PRELUDE = '''
import json, os, subprocess, sys, time
from pathlib import Path
MNT = Path(sys.argv[1])
subprocess.run(["mount", "-t", "tmpfs", "-o", "size=" + sys.argv[2] + ",mode=0755", "tmpfs", str(MNT)], check=True)

def fill(path):
    """Write zeros into `path` until the file system is full; returns the bytes written."""
    n = 0
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        while True:
            n += os.write(fd, b"\\0" * 4096)
    except OSError:
        return n
    finally:
        os.close(fd)
'''


def need_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("a mount namespace with a tmpfs needs root")


def run_child(code: str, mnt: Path, *, size: str = "1m", timeout: float = 300,
              env: dict[str, str] | None = None) -> dict:
    """Run `code` (after PRELUDE) in its own mount namespace with a tmpfs of `size` at `mnt`."""
    need_root()
    mnt.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(["unshare", "--mount", "--propagation", "private", sys.executable, "-c",
                           PRELUDE + code, str(mnt), size],
                          capture_output=True, text=True, timeout=timeout, env=env)
    lines = proc.stdout.strip().splitlines()
    assert proc.returncode == 0 and lines, f"child failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    result = json.loads(lines[-1])
    result["_stderr"] = proc.stderr
    return result
