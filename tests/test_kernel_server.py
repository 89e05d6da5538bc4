"""The capsem kernel behind a real jupyter_server (subprocess, random port, token): REST start,
execute and interrupt over the kernel's websocket, REST delete, and SIGKILL of the server."""

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from contextlib import contextmanager
from datetime import datetime, timezone

import pytest
import websocket

from kernel_helpers import KERNEL, STARTUP_TIMEOUT, pid_alive, vm_processes, wait_gone

pytestmark = [pytest.mark.vm, pytest.mark.timeout(1200)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, root, log):
        self.root = root
        self.port = free_port()
        self.token = secrets.token_hex(16)
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "jupyter_server", "--no-browser", "--allow-root",
             "--ServerApp.ip=127.0.0.1", f"--ServerApp.port={self.port}", "--ServerApp.port_retries=0",
             f"--IdentityProvider.token={self.token}", f"--ServerApp.root_dir={root}",
             # a TCG guest needs longer than the default 60 s to answer its first kernel_info
             f"--MappingKernelManager.kernel_info_timeout={STARTUP_TIMEOUT}"],
            stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ))
        deadline = time.monotonic() + 120
        while True:
            try:
                self.api("GET", "/api/status")
                break
            except (urllib.error.URLError, ConnectionError):
                assert self.proc.poll() is None, "jupyter_server exited"
                assert time.monotonic() < deadline, "jupyter_server did not come up"
                time.sleep(0.3)

    def api(self, method: str, path: str, body=None, timeout: float = STARTUP_TIMEOUT + 60):
        req = urllib.request.Request(self.url + path, method=method,
                                     data=None if body is None else json.dumps(body).encode(),
                                     headers={"Authorization": f"token {self.token}",
                                              "Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            data = resp.read()
            return resp.status, (json.loads(data) if data else None)

    def websocket(self, kernel_id: str) -> websocket.WebSocket:
        return websocket.create_connection(
            f"ws://127.0.0.1:{self.port}/api/kernels/{kernel_id}/channels?session_id={uuid.uuid4().hex}",
            header=[f"Authorization: token {self.token}"], timeout=STARTUP_TIMEOUT + 60)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # jupyter_server: SIGINT twice = stop without asking
            time.sleep(0.5)
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@contextmanager
def jupyter_server(root, log_path):
    with open(log_path, "wb") as log:
        server = Server(root, log)
        try:
            yield server
        finally:
            server.stop()


def ws_request(ws, msg_type: str, content: dict, channel: str = "shell") -> str:
    msg_id = uuid.uuid4().hex
    ws.send(json.dumps({
        "header": {"msg_id": msg_id, "username": "test", "session": "capsem-test", "msg_type": msg_type,
                   "version": "5.3", "date": datetime.now(timezone.utc).isoformat()},
        "parent_header": {}, "metadata": {}, "content": content, "buffers": [], "channel": channel}))
    return msg_id


def ws_execute(ws, code: str, timeout: float = 120, on_busy=None) -> tuple[dict, list[dict]]:
    """(execute_reply content, iopub messages of this request)."""
    msg_id = ws_request(ws, "execute_request", {"code": code, "silent": False, "store_history": True,
                                                "user_expressions": {}, "allow_stdin": False,
                                                "stop_on_error": True})
    reply, outputs, idle = None, [], False
    deadline = time.monotonic() + timeout
    while reply is None or not idle:
        ws.settimeout(max(1.0, deadline - time.monotonic()))
        msg = json.loads(ws.recv())
        if msg.get("parent_header", {}).get("msg_id") != msg_id:
            continue
        if msg["msg_type"] == "execute_reply":
            reply = msg["content"]
        elif msg["msg_type"] == "status":
            idle = msg["content"]["execution_state"] == "idle"
        elif msg["msg_type"] == "execute_input" and on_busy:
            on_busy()
        elif msg["msg_type"] != "execute_input":
            outputs.append(msg)
    return reply, outputs


def stdout(outputs) -> str:
    return "".join(m["content"]["text"] for m in outputs if m["msg_type"] == "stream")


def test_rest_start_websocket_execute_interrupt_delete(capsem_kernelspecs, tmp_path):
    root = tmp_path / "root"
    (root / "project").mkdir(parents=True)
    with jupyter_server(root, tmp_path / "server.log") as server:
        status, specs = server.api("GET", "/api/kernelspecs")
        assert KERNEL in specs["kernelspecs"]
        assert specs["kernelspecs"][KERNEL]["spec"]["metadata"]["kernel_provisioner"]["provisioner_name"] \
            == "capsem-provisioner"

        t0 = time.monotonic()
        status, model = server.api("POST", "/api/kernels", {"name": KERNEL, "path": "project"})
        assert status == 201 and model["name"] == KERNEL
        kernel_id = model["id"]
        ws = server.websocket(kernel_id)
        try:
            reply, outputs = ws_execute(ws, "import os; print(os.getcwd()); open('from_ws.txt', 'w').write('hi')")
            started = time.monotonic() - t0
            assert reply["status"] == "ok", reply
            assert stdout(outputs) == f"{root / 'project'}\n"
            assert (root / "project" / "from_ws.txt").read_text() == "hi"

            # Interrupt through the REST API (message mode): KeyboardInterrupt, the kernel lives on.
            reply, outputs = ws_execute(ws, "import time\nwhile True: time.sleep(0.01)",
                                        on_busy=lambda: (time.sleep(1), server.api(
                                            "POST", f"/api/kernels/{kernel_id}/interrupt")))
            assert reply["status"] == "error" and reply["ename"] == "KeyboardInterrupt", reply
            reply, outputs = ws_execute(ws, "print(6 * 7)")
            assert stdout(outputs) == "42\n"
            # The server learns the state from its own iopub connection, not the websocket's: the
            # same idle status reaches it a moment before or after (two streams, two relays)
            deadline = time.monotonic() + 10
            while (state := server.api("GET", f"/api/kernels/{kernel_id}")[1]["execution_state"]) != "idle":
                assert time.monotonic() < deadline, f"the server still reports the kernel {state!r}"
                time.sleep(0.1)
        finally:
            ws.close()

        assert vm_processes(root), "no virtiofsd for the kernel's folder"
        t0 = time.monotonic()
        status, _ = server.api("DELETE", f"/api/kernels/{kernel_id}")
        assert status == 204
        gone = wait_gone(root, timeout=30)
        wait_gone(timeout=30)
        assert server.api("GET", "/api/kernels")[1] == []
        print(f"kernel usable over the websocket {started:.1f} s after POST; "
              f"VM gone {time.monotonic() - t0:.1f} s after DELETE ({gone:.1f} s after it returned)")


def test_server_sigkill_takes_its_vms_along(capsem_kernelspecs, tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    before = set(vm_processes())
    with jupyter_server(root, tmp_path / "server.log") as server:
        status, model = server.api("POST", "/api/kernels", {"name": KERNEL, "path": ""})
        assert status == 201
        ours = [p for p in vm_processes() if p not in before] + vm_processes(root)
        pids = {int(p.split()[0]) for p in ours}
        assert any("qemu-system" in p for p in ours) and any("virtiofsd" in p for p in ours), ours
        server.proc.kill()
        server.proc.wait()
        t0 = time.monotonic()
        while alive := [pid for pid in pids if pid_alive(pid)]:
            assert time.monotonic() - t0 < 10, f"still running {time.monotonic() - t0:.0f} s after SIGKILL: {alive}"
            time.sleep(0.1)
        print(f"all {len(pids)} VM processes gone {time.monotonic() - t0:.2f} s after the server's SIGKILL")
    wait_gone(root, timeout=5)
