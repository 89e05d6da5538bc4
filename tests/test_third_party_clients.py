"""Third-party Jupyter clients, unchanged, on a real capsem kernel (one VM per client run):
AutoGen's JupyterCodeExecutor (autogen-ext 0.7, kernel_name="capsem"), papermill's Python API and
papermill's command line (`-k capsem`). Nothing of capsem is imported by the clients: they find the
`capsem` kernelspec (installed by `capsem kernel install` into a private prefix, conftest's
`capsem_kernelspecs`) as any Jupyter kernel.

"The internet" is egress_world.World; its policy is the user's policy (policy.toml in
CAPSEM_CONFIG_DIR), which is what a kernel started by any client gets. An allowed request reaching
the test server proves the code ran behind the capsem proxy (the host cannot even resolve
api.test.example: only the proxy's resolve map knows it); a refused one comes back as the proxy's
403 with rule, code and reason.
"""

from __future__ import annotations

import asyncio
import base64
import os
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

from egress_world import World
from kernel_helpers import KERNEL, STARTUP_TIMEOUT, wait_gone

from capsem_kernel import loop_thread

pytestmark = pytest.mark.vm

PNG = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="
GET = ("import urllib.request, urllib.error\n"
       "def get(u):\n"
       "    try:\n"
       "        r = urllib.request.urlopen(u, timeout=120)\n"
       "        return r.status, r.read().decode()\n"
       "    except urllib.error.HTTPError as e:\n"
       "        return e.code, e.read().decode()\n")
SHOW_PNG = f"from IPython.display import Image, display\nimport base64\ndisplay(Image(data=base64.b64decode('{PNG}')))"


@pytest.fixture(scope="module")
def w(capsem_kernelspecs, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("clients")
    os.chmod(tmp, 0o755)
    world = loop_thread.run_sync(World.create(tmp), timeout=180)
    try:
        config = Path(os.environ["CAPSEM_CONFIG_DIR"])  # World made it private (and empty)
        config.mkdir(mode=0o755, exist_ok=True)
        policy = config / "policy.toml"
        policy.write_text(world.policy_text)
        os.chmod(policy, 0o644)
        yield world
    finally:
        loop_thread.run_sync(world.close(), timeout=60)


def folder(tmp_path: Path) -> Path:
    work = tmp_path / "work"
    work.mkdir(mode=0o755)
    return work


def test_autogen_jupyter_code_executor(w, tmp_path, monkeypatch):
    from autogen_core import CancellationToken
    from autogen_core.code_executor import CodeBlock
    from autogen_ext.code_executors.jupyter import JupyterCodeExecutor

    work = folder(tmp_path)
    monkeypatch.chdir(work)  # the kernel's folder (nbclient starts it in the cwd)
    allowed = f"https://api.test.example:{w.HTTPS}/echo/autogen"
    admin = f"https://api.test.example:{w.HTTPS}/admin/autogen"

    async def main():
        async with JupyterCodeExecutor(kernel_name=KERNEL, timeout=int(STARTUP_TIMEOUT),
                                       output_dir=tmp_path / "out") as executor:
            async def run(code: str):
                return await executor.execute_code_blocks([CodeBlock(code=code, language="python")],
                                                          CancellationToken())
            return [await run("print('hello from autogen'); x = 6"),
                    await run("print(x * 7)"),
                    await run(GET + f"print(get({allowed!r})[0])\nprint(get({admin!r}))"),
                    await run(SHOW_PNG),
                    await run("raise ValueError('autogen boom')"),
                    await run("print('still', x)")]

    hello, state, net, image, error, after = asyncio.run(main())
    assert (hello.exit_code, hello.output.strip()) == (0, "hello from autogen")
    assert (state.exit_code, state.output.strip()) == (0, "42")
    assert net.exit_code == 0 and net.output.splitlines()[0] == "200", net.output
    assert "403" in net.output and "code: rule-deny" in net.output and "admin is off limits" in net.output
    assert w.wait_rows(url=allowed, decision="allow", rule="api")
    assert image.exit_code == 0 and [p.suffix for p in image.output_files] == [".png"]
    assert image.output_files[0].read_bytes() == base64.b64decode(PNG)
    assert error.exit_code == 1 and "ValueError: autogen boom" in error.output
    assert (after.exit_code, after.output.strip()) == (0, "still 6")
    wait_gone(work, timeout=30)  # the executor's exit stopped the VM


def notebook(path: Path, cells: list[str], parameters: str) -> None:
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": KERNEL, "display_name": "capsem", "language": "python"}
    params = nbformat.v4.new_code_cell(parameters)
    params.metadata["tags"] = ["parameters"]
    nb.cells = [params] + [nbformat.v4.new_code_cell(c) for c in cells]
    nbformat.write(nb, path)


def outputs(path: Path) -> list[list[dict]]:
    """Each code cell's outputs of an executed notebook."""
    return [c.outputs for c in nbformat.read(path, as_version=4).cells if c.cell_type == "code"]


def stream_text(cell_outputs: list[dict]) -> str:
    return "".join(o.get("text", "") for o in cell_outputs if o.output_type == "stream")


def test_papermill_python_api(w, tmp_path):
    import papermill

    work = folder(tmp_path)
    allowed = f"https://api.test.example:{w.HTTPS}/echo/papermill"
    notebook(work / "in.ipynb", [
        "print(n * 7)",
        GET + f"print(get({allowed!r})[0])\nprint(get('https://api.test.example:{w.HTTPS}/admin/papermill'))",
        SHOW_PNG,
        "open('written-by-the-kernel.txt', 'w').write('from the vm')",
        "raise ValueError('papermill boom')",
    ], parameters="n = 1")
    with pytest.raises(papermill.PapermillExecutionError, match="papermill boom"):
        papermill.execute_notebook(str(work / "in.ipynb"), str(work / "out.ipynb"), kernel_name=KERNEL,
                                   parameters={"n": 6}, cwd=str(work), start_timeout=int(STARTUP_TIMEOUT),
                                   execution_timeout=300, progress_bar=False)
    cells = outputs(work / "out.ipynb")  # papermill writes the notebook up to the failing cell
    injected = cells[1]  # papermill's injected-parameters cell comes after the parameters cell
    assert injected == [] and stream_text(cells[2]) == "42\n"
    net = stream_text(cells[3])
    assert net.startswith("200\n") and "code: rule-deny" in net and "admin is off limits" in net
    assert w.wait_rows(url=allowed, decision="allow", rule="api")
    assert [o.output_type for o in cells[4]] == ["display_data"] and cells[4][0].data["image/png"].strip() == PNG
    assert (work / "written-by-the-kernel.txt").read_text() == "from the vm"  # the shared folder
    assert any(o.output_type == "error" and o.ename == "ValueError" for o in cells[6])
    wait_gone(work, timeout=30)


def test_papermill_command_line(w, tmp_path):
    """`papermill -k capsem` in its own process: its own egress runtime and proxy, the same user policy."""
    work = folder(tmp_path)
    notebook(work / "in.ipynb", [
        "print(n * 6)",
        GET + "print(get('http://blocked.test.example/papermill-cli'))",
    ], parameters="n = 1")
    proc = subprocess.run([sys.executable, "-m", "papermill", str(work / "in.ipynb"), str(work / "out.ipynb"),
                           "-k", KERNEL, "-p", "n", "7", "--cwd", str(work),
                           "--start-timeout", str(int(STARTUP_TIMEOUT)), "--execution-timeout", "300",
                           "--no-progress-bar"], capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    cells = outputs(work / "out.ipynb")
    assert stream_text(cells[2]) == "42\n"
    refused = stream_text(cells[3])
    assert refused.startswith("(403, 'capsem: connection to blocked.test.example:80 blocked by egress policy")
    assert "no rule allows this (default deny)" in refused
    wait_gone(work, timeout=30)
