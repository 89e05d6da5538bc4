"""A real Jupyter server (or JupyterLab) in a subprocess, for the server-extension and browser
tests. Private JUPYTER_CONFIG_DIR/DATA_DIR/RUNTIME_DIR, so nothing of the user's leaks in; the
extension is enabled by the config the package installs (etc/jupyter/jupyter_server_config.d).
`capsem_server` adds one running capsem kernel (conftest.py's `server_world` fixture).
"""

from __future__ import annotations

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
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class JupyterServer:
    url: str
    token: str
    proc: subprocess.Popen
    log_path: Path
    headers: dict = field(default_factory=dict)

    def request(self, method: str, path: str, body: dict | None = None, *, token: bool = True,
                timeout: float = 60) -> tuple[int, dict | str]:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.url.rstrip("/") + path, data=data, method=method)
        if token:
            req.add_header("Authorization", f"token {self.token}")
        if data is not None:
            req.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                status, raw = resp.status, resp.read()
        except urllib.error.HTTPError as exc:
            status, raw = exc.code, exc.read()
        text = raw.decode(errors="replace")
        try:
            return status, json.loads(text) if text else {}
        except json.JSONDecodeError:
            return status, text

    def get(self, path: str, **kw):
        return self.request("GET", path, **kw)

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # jupyter asks to confirm on the 1st SIGINT from a tty only
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def quiet_lab_settings(tmp: Path) -> Path:
    """Private JupyterLab user settings: no "fetch Jupyter news?" toast, no update checks (no network)."""
    settings = tmp / "lab-user-settings"
    f = settings / "@jupyterlab" / "apputils-extension" / "notification.jupyterlab-settings"
    f.parent.mkdir(parents=True, exist_ok=True)
    f.write_text(json.dumps({"fetchNews": "false", "checkForUpdates": False}))
    return settings


def start_server(tmp: Path, *, lab: bool = False, root_dir: Path | None = None, args: list[str] = (),
                 env: dict | None = None, startup_timeout: float = 120) -> JupyterServer:
    tmp.mkdir(parents=True, exist_ok=True)
    port, token = free_port(), secrets.token_hex(16)
    full_env = dict(os.environ)
    for name in ("config", "data", "runtime"):
        d = tmp / f"jupyter-{name}"
        d.mkdir(exist_ok=True)
        full_env[f"JUPYTER_{name.upper()}_DIR"] = str(d)
    full_env.update(env or {})
    module = "jupyterlab" if lab else "jupyter_server"
    cmd = [sys.executable, "-m", module, "--no-browser", "--ip=127.0.0.1", f"--port={port}",
           f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root_dir or tmp}",
           "--ServerApp.port_retries=0", *args]
    if lab:
        cmd += [f"--LabApp.user_settings_dir={quiet_lab_settings(tmp)}",
                f"--LabApp.workspaces_dir={tmp / 'lab-workspaces'}"]
    if os.geteuid() == 0:
        cmd.append("--allow-root")
    log_path = tmp / ("lab.log" if lab else "server.log")
    log = open(log_path, "wb")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=full_env, cwd=str(root_dir or tmp),
                            start_new_session=True)
    log.close()
    server = JupyterServer(f"http://127.0.0.1:{port}/", token, proc, log_path)
    deadline = time.monotonic() + startup_timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"jupyter server exited ({proc.returncode}):\n{server.log()[-4000:]}")
        try:
            status, _ = server.get("/api/status", timeout=5)
            if status == 200:
                return server
        except OSError:
            pass
        time.sleep(0.3)
    server.stop()
    raise RuntimeError(f"jupyter server did not answer within {startup_timeout} s:\n{server.log()[-4000:]}")


@dataclass(frozen=True)
class ServerWorld:
    """What a module's `server_world` is: a capsem kernelspec `name` (also its temp folder) with
    `policy` (TOML), installed with 768 MiB and one CPU, in a server started with `args`."""
    name: str
    policy: str
    args: tuple[str, ...] = ()
    start_timeout: float = 400  # for POST /api/kernels (and for "ready" when until_ready)
    until_ready: bool = False   # wait (and assert) until the sandbox state is "ready"


@contextmanager
def capsem_server(tmp: Path, spec: ServerWorld) -> Iterator[dict]:
    """A Jupyter server with one capsem kernel started through its REST API: {"server", "kernel"
    (its id), "audit_db", "notebooks" (the server's root), "policy" (the file), "start_s"}."""
    policy = tmp / "policy.toml"
    policy.write_text(spec.policy)
    policy.chmod(0o600)
    prefix = tmp / "prefix"
    subprocess.run([sys.executable, "-m", "capsem_vm.cli", "kernel", "install", "--prefix", str(prefix),
                    "--name", spec.name, "--policy", str(policy), "--memory", "768", "--cpus", "1"],
                   check=True, capture_output=True, timeout=120)
    notebooks = tmp / "notebooks"
    notebooks.mkdir()
    rt = tmp / "rt"
    rt.mkdir(mode=0o700)
    audit_db = tmp / "audit.sqlite3"
    env = {"JUPYTER_PATH": str(prefix / "share" / "jupyter"), "CAPSEM_RUNTIME_DIR": str(rt)}
    server = start_server(tmp, root_dir=notebooks, env=env,
                          args=[f"--CapsemExtension.audit_db={audit_db}", *spec.args])
    try:
        t0 = time.monotonic()
        status, body = server.request("POST", "/api/kernels", {"name": spec.name}, timeout=spec.start_timeout)
        assert status == 201, (body, server.log()[-4000:])
        if spec.until_ready:
            # the VM is up; the sandbox is "booting" until the guest's ipykernel listens, then "ready"
            states = []
            while time.monotonic() - t0 < spec.start_timeout:
                states.append(server.get(f"/capsem/kernels/{body['id']}")[1]["state"])
                if states[-1] != "booting":
                    break
                time.sleep(0.5)
            assert states[-1] == "ready", states
        yield {"server": server, "kernel": body["id"], "audit_db": audit_db, "notebooks": notebooks,
               "policy": policy, "start_s": time.monotonic() - t0}
    finally:
        server.stop()
