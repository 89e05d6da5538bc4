"""nbval over every notebook in notebooks/, in capsem kernels (one VM per notebook).

Runs `pytest --nbval --nbval-kernel-name capsem` in a subprocess, as a user would, on a copy of
notebooks/ (the notebooks write and remove files next to themselves; the repo stays untouched).
"""

import re
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

from host_helpers import REPO
from kernel_helpers import KERNEL, STARTUP_TIMEOUT, wait_gone


NOTEBOOKS = REPO / "notebooks"
OURS = ("files.ipynb", "plot.ipynb", "network.ipynb")


def code_cells(path: Path) -> list:
    return [c for c in nbformat.read(path, as_version=4).cells if c.cell_type == "code"]


def test_notebooks_have_stored_outputs_to_compare():
    """No VM: nbval only proves something if the notebooks carry the outputs it compares."""
    names = sorted(p.name for p in NOTEBOOKS.glob("*.ipynb"))
    assert set(OURS) <= set(names)
    for name in names:
        nb = nbformat.read(NOTEBOOKS / name, as_version=4)
        assert nb.metadata.kernelspec.name == KERNEL, name
        cells = code_cells(NOTEBOOKS / name)
        with_output = [c for c in cells if c.outputs]
        assert len(with_output) >= len(cells) - 1, f"{name}: cells without stored outputs"
        for cell in cells:
            assert not any(o.output_type == "error" for o in cell.outputs), f"{name}: stored error"


@pytest.mark.vm
@pytest.mark.timeout(3600)  # one VM per notebook
def test_nbval_passes_on_every_notebook(capsem_kernelspecs, tmp_path):
    work = tmp_path / "notebooks"
    shutil.copytree(NOTEBOOKS, work, ignore=shutil.ignore_patterns("*.executed.ipynb", ".ipynb_checkpoints"))
    expected = sum(len(code_cells(p)) for p in work.glob("*.ipynb"))
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-rA", "--rootdir", str(tmp_path),
         "--nbval", "--nbval-kernel-name", KERNEL,
         "--nbval-kernel-startup-timeout", str(int(STARTUP_TIMEOUT)), "--nbval-cell-timeout", "120",
         str(work)],
        cwd=tmp_path, capture_output=True, text=True, timeout=3000)
    summary = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    assert re.fullmatch(rf"{expected} passed in [0-9.]+s( \(.*\))?", summary), summary
    for name in OURS:
        assert re.search(rf"PASSED .*{re.escape(name)}::Cell 0", proc.stdout), name
    # The notebooks cleaned up after themselves: the copy is as it was.
    assert sorted(p.name for p in work.iterdir()) == sorted(p.name for p in NOTEBOOKS.iterdir()
                                                           if not p.name.endswith(".executed.ipynb")
                                                           and p.name != ".ipynb_checkpoints")
    wait_gone(work, timeout=20)
    print(summary)
