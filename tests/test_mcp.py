"""`capsem mcp` end to end: the server spawned as a subprocess over stdio, driven by the official
`mcp` SDK's own client, with a real kernel in a real VM behind it (deny-all policy: nothing leaves
the machine). One MCP session (one VM) for the module; the tests run in file order and the last
one ends the session and checks nothing of the VM is left. Pure parts: test_mcp_unit.py.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import sys
import time
from pathlib import Path

import pytest

from host_helpers import helper_processes

from capsem_kernel import loop_thread

pytestmark = pytest.mark.vm

CALL = 900.0  # the first tool call includes a cold boot under TCG on a loaded host
PNG_B64 = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="
REPO = Path(__file__).resolve().parent.parent


class Session:
    """One `capsem mcp` subprocess and the SDK client talking to it, held open on the capsem loop
    thread across the module's tests (a client is entered and left in the same task)."""

    def __init__(self, tmp: Path, image_dir):
        from mcp import StdioServerParameters
        self.rt = tmp / "rt"
        self.rt.mkdir(mode=0o700)
        self.folder = tmp / "work"
        self.folder.mkdir()
        env = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "PYTHONPATH", "LANG", "USER")}
        env |= {"CAPSEM_RUNTIME_DIR": str(self.rt), "CAPSEM_DATA_DIR": str(tmp / "data"),
                "CAPSEM_CONFIG_DIR": str(tmp / "config")}  # empty config dir: no user policy, deny-all
        self.params = StdioServerParameters(
            command=sys.executable, cwd=str(REPO), env=env,
            args=["-m", "capsem_vm.cli", "mcp", "--folder", str(self.folder), "--image", str(image_dir),
                  "--no-pool", "--idle-timeout", "0"])
        self.client = None
        self.held = None

    def open(self) -> None:
        ready = loop_thread.run_sync(self._future())
        self.held = asyncio.run_coroutine_threadsafe(self._hold(ready), loop_thread.get_loop())
        self.client = loop_thread.run_sync(self._wait(ready), timeout=120)

    async def _future(self):
        self.stop = asyncio.Event()
        return asyncio.get_running_loop().create_future()

    async def _wait(self, ready):
        return await ready

    async def _hold(self, ready) -> None:
        from mcp import Client
        try:
            async with Client(self.params, read_timeout_seconds=CALL, raise_exceptions=True) as client:
                ready.set_result(client)
                await self.stop.wait()
        except BaseException as exc:
            if not ready.done():
                ready.set_exception(exc)
            raise

    def call(self, coro_fn, timeout: float = CALL):
        return loop_thread.run_sync(coro_fn(self.client), timeout=timeout)

    def close(self) -> None:
        if self.held is not None:
            loop_thread.get_loop().call_soon_threadsafe(self.stop.set)
            self.held.result(120)
            self.held = None


@pytest.fixture(scope="module")
def s(image_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mcp")
    os.chmod(tmp, 0o755)
    session = Session(tmp, image_dir)
    try:
        session.open()
        yield session
    finally:
        session.close()


def text(result) -> str:
    return "\n".join(c.text for c in result.content if c.type == "text")


def test_tool_list_boots_nothing(s):
    tools = s.call(lambda c: c.list_tools()).tools
    assert {t.name for t in tools} == {"run_code", "run_command", "restart", "network_log", "read_file",
                                       "write_file", "list_files"}  # issue 17: file tools added on purpose
    assert all(t.description for t in tools)
    assert not helper_processes(str(s.rt))  # lazily: no VM before the first tool call


def test_run_code_returns_text(s):
    t0 = time.monotonic()
    r = s.call(lambda c: c.call_tool("run_code", {"code": "x = 6\nprint('hello', flush=True)\nx * 7"}))
    print(f"\nfirst run_code (cold boot included) {time.monotonic() - t0:.1f} s")
    assert not r.is_error and [c.type for c in r.content] == ["text"]
    assert "[stdout]\nhello" in text(r) and "[result]\n42" in text(r)
    assert helper_processes(str(s.rt))
    r = s.call(lambda c: c.call_tool("run_code", {"code": "raise ValueError('nope')"}))
    assert "[error] ValueError: nope" in text(r) and "\x1b" not in text(r)


def test_run_code_returns_an_image(s):
    r = s.call(lambda c: c.call_tool("run_code", {"code": (
        "import base64\nfrom IPython.display import Image, display\n"
        f"display(Image(data=base64.b64decode('{PNG_B64}'), format='png'))\n'done'")}))
    assert [c.type for c in r.content] == ["text", "image"]
    image = r.content[1]
    assert image.mime_type == "image/png" and base64.b64decode(image.data) == base64.b64decode(PNG_B64)
    assert "[result]\n'done'" in text(r)


def test_run_code_timeout_interrupts_and_keeps_the_kernel(s):
    r = s.call(lambda c: c.call_tool("run_code", {"code": "import time\nkept = 5\ntime.sleep(600)", "timeout": 8}))
    assert "[error] TimeoutError" in text(r) and "interrupted" in text(r)
    assert "[result]\n10" in text(s.call(lambda c: c.call_tool("run_code", {"code": "kept * 2"})))


def test_run_command_exit_code_in_the_folder(s):
    r = s.call(lambda c: c.call_tool("run_command", {"command": "echo in-guest > made.txt; pwd; exit 3"}))
    assert text(r).startswith("exit code: 3") and f"[stdout]\n{s.folder}" in text(r)
    assert (s.folder / "made.txt").read_text() == "in-guest\n"  # the shared folder


def test_refused_request_in_run_code_and_network_log(s):
    r = s.call(lambda c: c.call_tool("run_code", {"code": (
        "import urllib.request, urllib.error\n"
        "try:\n    urllib.request.urlopen('http://blocked.test.example/mcp-refused', timeout=120)\n"
        "except urllib.error.HTTPError as e:\n    print(e.code)")}))
    assert "[stdout]\n403" in text(r), text(r)
    assert "refused" in text(r) and "blocked.test.example" in text(r)
    rows = json.loads(text(s.call(lambda c: c.call_tool("network_log", {}))))
    refused = [r for r in rows if r["host"] == "blocked.test.example"]
    assert refused and {r["decision"] for r in refused} == {"deny"} and {r["code"] for r in refused} == {"default-deny"}


def test_file_tools_through_the_guest_agent(s):
    r = s.call(lambda c: c.call_tool("write_file", {"path": "sub/f.txt", "content": "über"}))
    assert not r.is_error and (s.folder / "sub" / "f.txt").read_text() == "über"
    assert text(s.call(lambda c: c.call_tool("read_file", {"path": "sub/f.txt"}))) == "über"
    assert "f.txt" in text(s.call(lambda c: c.call_tool("list_files", {"path": "sub"})))
    os.symlink("/etc/passwd", s.folder / "host_link")  # only the host user can make links there
    r = s.call(lambda c: c.call_tool("read_file", {"path": "host_link"}))
    assert r.is_error and "path_refused" in text(r) and "root:" not in text(r)


def test_restart_gives_a_fresh_kernel(s):
    assert "restarted" in text(s.call(lambda c: c.call_tool("restart", {})))
    r = s.call(lambda c: c.call_tool("run_code", {"code": "'kept' in globals()"}))
    assert "[result]\nFalse" in text(r)


def test_session_end_leaves_no_vm(s):
    assert helper_processes(str(s.rt))
    s.close()
    deadline = time.monotonic() + 60
    while left := helper_processes(str(s.rt), str(s.folder)):
        assert time.monotonic() < deadline, f"VM processes left after the session ended: {left}"
        time.sleep(0.2)
    assert s.folder.is_dir()  # a folder given with --folder is the user's: kept
