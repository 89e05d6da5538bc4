"""JupyterLab and `jupyter console` as a normal user, from the installed wheel (issue 16): the same
world as test_normal_user.py (the wheel installed in a fresh venv outside the checkout, `capsemtest`
with no supplementary groups, the checkout hidden, the user's own proxy env), plus what a user
installs for the front ends: `pip install 'capsem-jupyter[lab]'` from the package index. The wheel's
server extension and labextension are enabled by the files it put in that venv, nothing else.

- `jupyter lab` as the user (token, 127.0.0.1): a capsem kernel started through the REST API runs a
  cell over the kernel websocket that fetches from a real server on this machine through the proxy
  and gets a refused request's 403; the extension's REST shows the VM facts (ready, the user's own
  runtime dir) and both network rows; the kernel and the server shut down and leave nothing.
- `jupyter console --kernel capsem` as the user in a pty runs a cell."""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from pathlib import Path

import pexpect
import pytest

from host_helpers import as_user_argv, helper_processes, owned_by_others
from test_normal_user import SECRET_REASON, world  # noqa: F401 - the module's world fixture

pytestmark = [pytest.mark.vm, pytest.mark.timeout(1200),
              pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run as another user")]


@pytest.fixture(scope="module")
def lab_world(world):  # noqa: F811 - the imported fixture
    """The world with the `lab` extra of the installed wheel (JupyterLab, jupyter console)."""
    installed = world.installed
    pip = subprocess.run([str(installed["venv"] / "bin" / "pip"), "install", "-q", f"{installed['wheel']}[lab]"],
                         capture_output=True, text=True, timeout=900)
    assert pip.returncode == 0, pip.stderr[-3000:]
    subprocess.run(["chmod", "-R", "a+rX", str(installed["venv"])], check=True)
    return world


def _user_processes(uid: int) -> list[str]:
    """Live processes of `uid` ("pid cmdline")."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and entry.stat().st_uid == uid:
                state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
                if state != "Z":
                    args = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                    found.append(f"{entry.name} {args}")
        except (OSError, IndexError):
            continue
    return found


def _nothing_running(world, home: Path, timeout: float = 30) -> None:
    """No VM helper of `home` and no process of the user's within `timeout` (the proxy child gets
    SIGTERM by PR_SET_PDEATHSIG when its Jupyter process exits and writes its queued rows first)."""
    deadline = time.monotonic() + timeout
    while (helper_processes(str(home)) or _user_processes(world.user.pw_uid)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not helper_processes(str(home)) and not _user_processes(world.user.pw_uid)


LAB = r"""
import asyncio, json, os, secrets, socket, subprocess, sys, time, urllib.error, urllib.request, uuid
from tornado.websocket import websocket_connect
url, secret_url = sys.argv[1:3]
with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
token, base = secrets.token_hex(16), f"http://127.0.0.1:{port}"
got = {}

def req(method, path, body=None, timeout=60):
    r = urllib.request.Request(base + path, method=method, data=None if body is None else json.dumps(body).encode(),
                               headers={"Authorization": f"token {token}", "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(r, timeout=timeout) as resp:
            status, raw = resp.status, resp.read()
    except urllib.error.HTTPError as e:
        status, raw = e.code, e.read()
    try:
        return status, json.loads(raw) if raw else {}
    except ValueError:
        return status, raw.decode(errors="replace")

async def run_cell(kid, code):
    ws = await websocket_connect(f"ws://127.0.0.1:{port}/api/kernels/{kid}/channels?token={token}")
    msg_id = uuid.uuid4().hex
    ws.write_message(json.dumps({"channel": "shell", "header": {"msg_id": msg_id, "msg_type": "execute_request",
        "username": "u", "session": uuid.uuid4().hex, "version": "5.3", "date": ""}, "parent_header": {}, "metadata": {},
        "content": {"code": code, "silent": False, "store_history": True, "user_expressions": {}, "allow_stdin": False}}))
    out = []
    while True:
        m = json.loads(await asyncio.wait_for(ws.read_message(), 300))
        if m.get("parent_header", {}).get("msg_id") != msg_id:
            continue
        if m["msg_type"] == "stream":
            out.append(m["content"]["text"])
        elif m["msg_type"] == "error":
            out.append("ERROR " + m["content"]["ename"] + ": " + m["content"]["evalue"])
        elif m["msg_type"] == "status" and m["content"]["execution_state"] == "idle":
            ws.close()
            return "".join(out)

log = open("lab.log", "wb")
t0 = time.monotonic()
server = subprocess.Popen(["jupyter", "lab", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
                           "--ServerApp.port_retries=0", f"--IdentityProvider.token={token}",
                           "--ServerApp.root_dir=" + os.path.expanduser("~/notebooks")],
                          stdout=log, stderr=subprocess.STDOUT)
try:
    while time.monotonic() - t0 < 120:
        assert server.poll() is None, "jupyter lab exited"
        try:
            if req("GET", "/api/status", timeout=5)[0] == 200:
                break
        except OSError:
            pass
        time.sleep(0.2)
    got["server_s"] = time.monotonic() - t0
    status, page = req("GET", "/lab")
    got["labextension"] = status == 200 and "@capsem/jupyterlab-capsem" in page
    t1 = time.monotonic()
    # path "": the notebook folder (the server's root), as JupyterLab names a notebook's folder;
    # without a path the kernel would share the server's cwd (here $HOME, where the policy is: refused)
    status, kernel = req("POST", "/api/kernels", {"name": "capsem", "path": ""}, timeout=600)
    assert status == 201, (status, kernel)
    kid = kernel["id"]
    while time.monotonic() - t1 < 600:
        facts = req("GET", f"/capsem/kernels/{kid}")[1]
        if facts.get("state") != "booting":
            break
        time.sleep(0.3)
    got["kernel_s"], got["facts"] = time.monotonic() - t1, facts
    # the VM's runtime dir: the processes whose command line names the user's run dir, with their owner
    run = os.path.expanduser("~/.local/share/capsem/run")
    got["helpers"] = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            args = open(f"/proc/{pid}/cmdline", "rb").read().split(b"\0")
            if any(run.encode() + b"/" in a for a in args):
                got["helpers"].append([os.path.basename(args[0].decode()), os.stat(f"/proc/{pid}").st_uid])
        except OSError:
            pass
    got["run"] = [[n, os.stat(os.path.join(run, n)).st_mode & 0o777, os.stat(os.path.join(run, n)).st_uid]
                  for n in sorted(os.listdir(run))]
    t2 = time.monotonic()
    got["cell"] = asyncio.run(run_cell(kid,
        "import urllib.request, urllib.error\nprint(urllib.request.urlopen(%r, timeout=60).read().decode())\n"
        "try:\n    urllib.request.urlopen(%r, timeout=60)\nexcept urllib.error.HTTPError as e:\n"
        "    print(e.code, e.headers.get('X-Capsem-Policy'))" % (url, secret_url)))
    got["cell_s"] = time.monotonic() - t2
    got["network"] = req("GET", f"/capsem/kernels/{kid}/network?barrier=1")
    got["delete"] = req("DELETE", f"/api/kernels/{kid}", timeout=120)[0]
    got["shutdown"] = req("POST", "/api/shutdown")[0]
    got["server_rc"] = server.wait(60)
finally:
    if server.poll() is None:
        server.kill()
print("RESULT " + json.dumps(got))
"""


def test_jupyterlab_as_a_user_runs_a_capsem_kernel_through_the_proxy(lab_world, record_property):
    world = lab_world
    home = world.home("nu-lab", {"drive_lab.py": LAB})
    out = world.run(home, f"""
capsem kernel install --user --policy "$HOME/policy.toml"
jupyter server extension list 2>&1 | grep -F capsem_kernel.server
python drive_lab.py {world.url} {world.secret_url}
""")
    log = (home / "lab.log").read_text(errors="replace") if (home / "lab.log").exists() else ""
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:] + log[-4000:]
    assert "enabled" in next(x for x in out.stdout.splitlines() if "capsem_kernel.server" in x), out.stdout
    got = json.loads(next(x for x in out.stdout.splitlines() if x.startswith("RESULT "))[7:])
    for name in ("server_s", "kernel_s", "cell_s"):
        record_property(f"user_lab_{name}", round(got[name], 1))
    print(f"user jupyter lab: server up {got['server_s']:.1f} s, kernel ready through REST {got['kernel_s']:.1f} s,"
          f" first cell (two fetches) {got['cell_s']:.1f} s")
    assert got["labextension"], log[-3000:]
    assert got["cell"] == f'hello from this machine\n403 deny; rule="secret"; reason="{SECRET_REASON}"\n', got["cell"]
    facts = got["facts"]
    assert facts["state"] == "ready" and facts["kernel_name"] == "capsem", facts
    assert facts["proxy"]["state"] == "running", facts
    # the runtime dir is the user's own (no XDG_RUNTIME_DIR: under the user's data dir), 0700, and the
    # VM's helpers that use it run as the user (the facts do not carry the dir: read from the helpers)
    run = home / ".local" / "share" / "capsem" / "run"
    assert run.stat().st_uid == world.user.pw_uid and (run.stat().st_mode & 0o777) == 0o700
    assert {"qemu-system-x86_64", "vhost-device-vsock"} <= {name for name, _ in got["helpers"]}, got["helpers"]
    assert {uid for _, uid in got["helpers"]} == {world.user.pw_uid}, got["helpers"]
    vm_dirs = [(mode, uid) for name, mode, uid in got["run"] if not name.startswith("proxy")]
    assert vm_dirs and set(vm_dirs) == {(0o700, world.user.pw_uid)}, got["run"]
    assert facts["shares"] == [{"path": str(home / "notebooks"), "mode": "rw"}], facts
    status, net = got["network"]
    assert status == 200, net
    # the HTTP rows (each connection has its own row too, without a path)
    rows = [(r["host"], r["path"], r["decision"], r["status"]) for r in net["rows"] if r["path"]]
    assert rows == [(world.addr, "/hello.txt", "allow", 200), (world.addr, "/secret/key.txt", "deny", 403)], rows
    assert (got["delete"], got["shutdown"], got["server_rc"]) == (204, 200, 0), got
    _nothing_running(world, home)
    assert not owned_by_others(home, world.user.pw_uid)
    # the VM's dir is gone; what stays by design: the proxy child's code links and the proxy's log
    left = [p.name for p in run.iterdir() if not re.fullmatch(r"proxy-code-[0-9a-f]+|proxy-[0-9]+\.log", p.name)]
    assert not left, left


def test_jupyter_console_as_a_user_runs_a_cell(lab_world, record_property):
    world = lab_world
    home = world.home("nu-console")
    install = world.run(home, 'capsem kernel install --user --policy "$HOME/policy.toml"')
    assert install.returncode == 0, install.stderr[-3000:]
    script = world.PROLOGUE + "cd notebooks\nexec jupyter console --kernel capsem --simple-prompt " \
                              "--ZMQTerminalInteractiveShell.kernel_timeout=600\n"
    argv = as_user_argv(world.user.pw_name, script, world.env(home, {"TERM": "xterm"}))
    child = pexpect.spawn(argv[0], argv[1:], cwd="/", env={"PATH": os.environ["PATH"]}, encoding="utf-8",
                          codec_errors="replace", timeout=60, dimensions=(40, 200))
    try:
        t0 = time.monotonic()
        child.expect(r"In \[1\]: ", timeout=660)
        started = time.monotonic() - t0
        child.sendline("import os; print('answer', 6 * 7, os.getcwd())")
        child.expect(f"answer 42 {home / 'notebooks'}", timeout=120)
        child.expect(r"In \[2\]: ", timeout=60)
        first_cell = time.monotonic() - t0 - started
        child.sendline("exit")
        child.expect(pexpect.EOF, timeout=120)
    finally:
        if child.isalive():
            child.terminate(force=True)
    child.close()
    assert child.exitstatus == 0, child.before
    record_property("user_console_ready_s", round(started, 1))
    record_property("user_console_first_cell_s", round(first_cell, 1))
    print(f"user jupyter console: prompt after {started:.1f} s, first cell {first_cell:.1f} s")
    _nothing_running(world, home)
    assert not owned_by_others(home, world.user.pw_uid)
