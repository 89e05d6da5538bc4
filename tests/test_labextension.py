"""The JupyterLab extension: its TypeScript unit tests (vitest, through npm) and that the package
installed it (labextension enabled, server extension enabled) with no separate npm step."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
EXT = REPO / "labextension"
BIN = Path(sys.executable).parent


def _npm(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    npm = shutil.which("npm")
    if npm is None:
        pytest.fail("npm not found (scripts/setup-system.sh installs Node.js)")
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", CI="1")
    return subprocess.run([npm, *args], cwd=EXT, capture_output=True, text=True, timeout=timeout, env=env)


@pytest.fixture(scope="module")
def node_modules():
    if not (EXT / "node_modules" / ".package-lock.json").exists():
        proc = _npm("ci", "--no-audit", "--no-fund")
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def test_typescript_unit_tests(node_modules):
    proc = _npm("test")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-5000:]
    assert " passed" in out and "failed" not in out.replace("0 failed", ""), out[-3000:]


def test_typescript_typechecks(node_modules):
    proc = _npm("exec", "--", "tsc", "--noEmit", "-p", ".")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def _jupyter(*args: str) -> str:
    proc = subprocess.run([str(BIN / "jupyter"), *args], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout + proc.stderr


def test_labextension_installed_and_enabled():
    out = _jupyter("labextension", "list")
    line = next((ln for ln in out.splitlines() if "@capsem/jupyterlab-capsem" in ln), "")
    assert "enabled" in line and "OK" in line, out


def test_server_extension_enabled():
    out = _jupyter("server", "extension", "list")
    line = next((ln for ln in out.splitlines() if "capsem_kernel.server" in ln and "enabled" in ln), "")
    assert line, out
