"""The main job, end to end: execute a real notebook in a capsem kernel and show what it printed.

    python scripts/demo.py [NOTEBOOK] [--lab]

Installs the capsem kernelspec into this env if needed, runs NOTEBOOK (default
notebooks/hello_sandbox.ipynb) with nbclient in kernel "capsem", prints each cell's outputs, and
writes the executed copy next to the input as *.executed.ipynb. With --lab, then starts
JupyterLab with the capsem kernel and the capsem extension (status item, Sandbox panel) and prints
its URL.
"""

from __future__ import annotations

import argparse
import os
import secrets
import socket
import subprocess
import sys
import time
from pathlib import Path

import nbformat
from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel
from nbclient import NotebookClient

REPO = Path(__file__).resolve().parent.parent


def ensure_kernelspec() -> None:
    try:
        KernelSpecManager().get_kernel_spec("capsem")
    except NoSuchKernel:
        subprocess.run([sys.executable, "-m", "capsem_vm.cli", "kernel", "install", "--sys-prefix"], check=True)


def free_port(preferred: int = 8888) -> int:
    for port in (preferred, 0):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return s.getsockname()[1]
    raise RuntimeError("no free port")


def start_lab() -> int:
    out = subprocess.run([sys.executable, "-m", "jupyter", "labextension", "list"], capture_output=True, text=True)
    listed = [ln for ln in (out.stdout + out.stderr).splitlines() if "@capsem/jupyterlab-capsem" in ln]
    if not any("enabled" in ln for ln in listed):
        print("capsem demo: warning: the capsem JupyterLab extension is not enabled (reinstall the package: "
              "pip install -e .)", file=sys.stderr)
    port, token = free_port(), secrets.token_hex(24)
    url = f"http://127.0.0.1:{port}/lab?token={token}"
    print("capsem demo: starting JupyterLab with the capsem kernel and the Sandbox panel")
    print(f"capsem demo: open {url}")
    print("capsem demo: pick 'Python 3 (Capsem sandbox)'; the status bar shows the sandbox, click it for the panel"
          " (Ctrl-C stops JupyterLab)", flush=True)
    cmd = [sys.executable, "-m", "jupyterlab", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
           "--ServerApp.port_retries=0", f"--IdentityProvider.token={token}", f"--notebook-dir={REPO / 'notebooks'}"]
    if os.geteuid() == 0:
        cmd.append("--allow-root")
    try:
        return subprocess.call(cmd)
    except KeyboardInterrupt:
        return 0


def show_outputs(nb) -> None:
    for i, cell in enumerate(nb.cells):
        if cell.cell_type != "code":
            continue
        print(f"\n[{i}] {cell.source.splitlines()[0] if cell.source else ''}")
        for out in cell.get("outputs", []):
            if out.output_type == "stream":
                print("    " + out.text.rstrip().replace("\n", "\n    "))
            elif out.output_type in ("execute_result", "display_data"):
                text = out.data.get("text/plain", "")
                kinds = ", ".join(sorted(out.data))
                print("    " + text.rstrip().replace("\n", "\n    ") + f"    <{kinds}>")
            elif out.output_type == "error":
                print(f"    ERROR {out.ename}: {out.evalue}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("notebook", nargs="?", default=str(REPO / "notebooks" / "hello_sandbox.ipynb"))
    parser.add_argument("--lab", action="store_true", help="afterwards start JupyterLab with the capsem kernel")
    args = parser.parse_args()

    ensure_kernelspec()
    path = Path(args.notebook).resolve()
    nb = nbformat.read(path, as_version=4)
    print(f"capsem demo: executing {path.name} in a capsem kernel (each kernel boots its own VM)...", flush=True)
    t0 = time.monotonic()
    client = NotebookClient(nb, kernel_name="capsem", timeout=600, startup_timeout=600,
                            resources={"metadata": {"path": str(path.parent)}})
    client.execute()
    print(f"capsem demo: notebook executed in {time.monotonic() - t0:.1f} s (VM boot included)")
    show_outputs(nb)
    out = path.with_suffix(".executed.ipynb")
    nbformat.write(nb, out)
    print(f"\ncapsem demo: executed copy written to {out}")
    if args.lab:
        return start_lab()
    return 0


if __name__ == "__main__":
    sys.exit(main())
