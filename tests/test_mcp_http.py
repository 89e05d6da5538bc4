"""`capsem mcp --http` end to end: the server as a subprocess on 127.0.0.1, driven by the `mcp`
SDK's own streamable-HTTP client, with real kernels in real VMs (deny-all policy: nothing leaves
the machine). Two MCP sessions, so two VMs; the last tests end them and check each session's VM
goes with its session. Without VMs: test_mcp_http_unit.py.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx2
import pytest

from host_helpers import helper_processes

from capsem_kernel import loop_thread

pytestmark = pytest.mark.vm

CALL = 900.0
REPO = Path(__file__).resolve().parent.parent
TOKEN = "capsem-test-token-" + "k" * 30


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Held:
    """One SDK client session held open on the capsem loop thread across tests."""

    def __init__(self, url: str, token: str = TOKEN):
        self.url, self.token = url, token
        self.held = None

    def open(self):
        ready = loop_thread.run_sync(self._future())
        self.held = asyncio.run_coroutine_threadsafe(self._hold(ready), loop_thread.get_loop())
        self.client = loop_thread.run_sync(self._wait(ready), timeout=120)
        return self

    async def _future(self):
        self.stop = asyncio.Event()
        return asyncio.get_running_loop().create_future()

    async def _wait(self, ready):
        return await ready

    async def _hold(self, ready):
        from mcp import Client
        from mcp.client.streamable_http import streamable_http_client
        from mcp.shared._httpx_utils import create_mcp_http_client
        http = create_mcp_http_client(headers={"Authorization": f"Bearer {self.token}"})
        try:
            async with Client(streamable_http_client(self.url, http_client=http),
                              read_timeout_seconds=CALL, raise_exceptions=True) as client:
                ready.set_result(client)
                await self.stop.wait()
        except BaseException as exc:
            if not ready.done():
                ready.set_exception(exc)
            raise

    def call(self, coro_fn, timeout: float = CALL):
        return loop_thread.run_sync(coro_fn(self.client), timeout=timeout)

    def close(self):
        if self.held is not None:
            loop_thread.get_loop().call_soon_threadsafe(self.stop.set)
            self.held.result(120)
            self.held = None


class Env:
    pass


@pytest.fixture(scope="module")
def e(image_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mcp_http")
    os.chmod(tmp, 0o755)
    env = Env()
    env.rt = tmp / "rt"
    env.rt.mkdir(mode=0o700)
    token_file = tmp / "token"
    token_file.write_text(TOKEN + "\n")
    os.chmod(token_file, 0o600)
    env.port = free_port()
    env.url = f"http://127.0.0.1:{env.port}/mcp"
    penv = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "PYTHONPATH", "LANG", "USER", "CAPSEM_CACHE_DIR")}
    penv |= {"CAPSEM_RUNTIME_DIR": str(env.rt), "CAPSEM_DATA_DIR": str(tmp / "data"),
             "CAPSEM_CONFIG_DIR": str(tmp / "config")}  # empty config dir: deny-all
    env.log = open(tmp / "server.log", "wb")
    env.proc = subprocess.Popen(
        [sys.executable, "-m", "capsem_vm.cli", "mcp", "--http", "--port", str(env.port), "--token-file",
         str(token_file), "--image", str(image_dir), "--no-pool", "--idle-timeout", "0"],
        cwd=str(REPO), env=penv, stdout=env.log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while True:
        try:
            httpx2.get(env.url, timeout=2)
            break
        except httpx2.TransportError:
            assert env.proc.poll() is None and time.monotonic() < deadline, (tmp / "server.log").read_text()
            time.sleep(0.2)
    env.sessions = []
    try:
        yield env
    finally:
        for s in env.sessions:
            try:
                s.close()
            except Exception:  # noqa: BLE001 - teardown
                pass
        env.proc.terminate()
        env.proc.wait(120)
        env.log.close()


def text(result) -> str:
    return "\n".join(c.text for c in result.content if c.type == "text")


def vm_count(rt) -> int:
    return sum(1 for p in helper_processes(str(rt)) if "qemu-system" in p)


def test_auth_is_required(e):
    for hdrs in ({}, {"Authorization": "Bearer wrong-token-of-some-length"}, {"Authorization": TOKEN}):
        r = httpx2.post(e.url, headers=hdrs, json={"jsonrpc": "2.0", "id": 1, "method": "tools/list"})
        assert r.status_code == 401
    bad = Held(e.url, token="wrong-token-of-some-length")
    with pytest.raises(BaseException):
        bad.open()
    assert vm_count(e.rt) == 0


def test_tools_listed_and_nothing_booted(e):
    a = Held(e.url).open()
    e.sessions.append(a)
    names = {t.name for t in a.call(lambda c: c.list_tools()).tools}
    assert names == {"run_code", "run_command", "read_file", "write_file", "list_files", "restart", "network_log"}
    assert vm_count(e.rt) == 0


def test_run_code_with_an_image_and_files(e):
    a = e.sessions[0]
    png = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="
    r = a.call(lambda c: c.call_tool("run_code", {"code": (
        "from IPython.display import Image, display\nimport base64\n"
        f"display(Image(data=base64.b64decode('{png}')))\nopen('made.txt', 'w').write('by the kernel')\n1 + 1")}))
    images = [c for c in r.content if c.type == "image"]
    assert images and base64.b64decode(images[0].data)[:4] == b"\x89PNG" and "[result]\n2" in text(r)
    assert text(a.call(lambda c: c.call_tool("read_file", {"path": "made.txt"}))) == "by the kernel"
    a.call(lambda c: c.call_tool("write_file", {"path": "d/w.txt", "content": "by the agent"}))
    assert "w.txt" in text(a.call(lambda c: c.call_tool("list_files", {"path": "d"})))
    r = a.call(lambda c: c.call_tool("read_file", {"path": "../../etc/passwd"}))
    assert r.is_error and "refused" in text(r)
    assert vm_count(e.rt) == 1


def test_refused_request_in_network_log(e):
    a = e.sessions[0]
    r = a.call(lambda c: c.call_tool("run_code", {"code": (
        "import urllib.request, urllib.error\n"
        "try:\n    urllib.request.urlopen('http://blocked.test.example/mcp-http', timeout=120)\n"
        "except urllib.error.HTTPError as e:\n    print(e.code)")}))
    assert "[stdout]\n403" in text(r), text(r)
    rows = json.loads(text(a.call(lambda c: c.call_tool("network_log", {}))))
    refused = [x for x in rows if x["host"] == "blocked.test.example"]
    assert refused and {x["decision"] for x in refused} == {"deny"}


def test_two_sessions_get_two_sandboxes(e):
    a = e.sessions[0]
    b = Held(e.url).open()
    e.sessions.append(b)
    boot = "cat /proc/sys/kernel/random/boot_id"
    boot_a = text(a.call(lambda c: c.call_tool("run_command", {"command": boot})))
    boot_b = text(b.call(lambda c: c.call_tool("run_command", {"command": boot})))
    assert boot_a.startswith("exit code: 0") and boot_b.startswith("exit code: 0") and boot_a != boot_b
    r = b.call(lambda c: c.call_tool("read_file", {"path": "made.txt"}))
    assert r.is_error  # its own (fresh) folder
    assert vm_count(e.rt) == 2


def test_session_end_closes_its_vm_only(e):
    a, b = e.sessions
    b.close()
    deadline = time.monotonic() + 120
    while vm_count(e.rt) != 1:
        assert time.monotonic() < deadline, f"VMs after one session ended: {helper_processes(str(e.rt))}"
        time.sleep(0.2)
    assert "exit code: 0" in text(a.call(lambda c: c.call_tool("run_command", {"command": "true"})))
    a.close()
    deadline = time.monotonic() + 120
    while left := helper_processes(str(e.rt)):
        assert time.monotonic() < deadline, f"VM processes left after both sessions ended: {left}"
        time.sleep(0.2)
