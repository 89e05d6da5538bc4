"""kernel_start and the channel relay, driven by jupyter_client through the real agent on the host."""

from __future__ import annotations

import glob
import json
import os
import pwd
import queue
import secrets
import signal
import socket
import statistics
import stat
import struct
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
from jupyter_client import BlockingKernelClient

from capsem_agent import protocol

from agent_harness import Agent, ChannelForwarder, closed_by_agent, open_channel

ECHO_KERNEL = r'''
# Stands in for `python -m ipykernel_launcher -f FILE`: an echo server on each of the five ports.
import json, socket, sys, threading
info = json.load(open(sys.argv[sys.argv.index("-f") + 1]))
def echo(c):
    c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    while True:
        d = c.recv(65536)
        if not d:
            c.close(); return
        c.sendall(d)
def serve(port):
    ls = socket.socket(); ls.bind(("127.0.0.1", port)); ls.listen(8)
    while True:
        threading.Thread(target=echo, args=(ls.accept()[0],), daemon=True).start()
ts = [threading.Thread(target=serve, args=(info[n + "_port"],)) for n in ("shell", "iopub", "stdin", "control", "hb")]
[t.start() for t in ts]
'''


def start_kernel(a: Agent, msg_id=1, cwd=None, **kw) -> tuple[dict, str]:
    key = secrets.token_hex(32)
    r = a.client.request({"t": "kernel_start", "id": msg_id, "key": key,
                          "signature_scheme": "hmac-sha256", "cwd": str(cwd or a.tmp), **kw}, timeout=60)
    return r, key


class Client:
    def __init__(self, a: Agent, key: str):
        self.fw = ChannelForwarder(a.channels_path)
        self.kc = BlockingKernelClient()
        self.kc.load_connection_info(self.fw.connection_info(key))
        # heartbeat only after ready: on a loaded 2-core machine the kernel can take over the 1 s
        # the heartbeat allows to start, and jupyter_client would then call it dead
        self.kc.start_channels(hb=False)
        self.kc.wait_for_ready(timeout=90)
        self.kc.hb_channel.start()

    def run(self, code: str, timeout=60) -> tuple[dict, str]:
        out = []

        def hook(msg):
            if msg["msg_type"] == "stream":
                out.append(msg["content"]["text"])
            elif msg["msg_type"] == "error":
                out.append(msg["content"]["ename"])
        reply = self.kc.execute_interactive(code, timeout=timeout, output_hook=hook)
        return reply["content"], "".join(out)

    def close(self):
        self.kc.stop_channels()
        self.fw.close()


def assert_loaded_without_debugpy(c: Client) -> None:
    """The kernel was imported with debugpy hidden (kernel_boot.import_ipykernel_without_debugpy):
    it reports no debugger (like the kernelspec) and has not loaded debugpy, which notebook code
    can still import."""
    c.kc.kernel_info()
    info = c.kc.get_shell_msg(timeout=60)
    content = info["content"]
    assert info["msg_type"] == "kernel_info_reply", info
    # ipykernel 6 says "debugger": false; 7 lists "debugger" in supported_features when it has one
    assert content.get("debugger", False) is False and "debugger" not in content.get("supported_features", []), content
    content, out = c.run("import sys; print('debugpy' in sys.modules); import debugpy; print(debugpy.__name__)")
    assert content["status"] == "ok" and out.split() == ["False", "debugpy"], (content, out)


def prewarm_preinit(a: Agent) -> None:
    """kernel_prewarm {preinit}, waiting until the pre-started kernel is initialised and warm."""
    r = a.client.request({"t": "kernel_prewarm", "id": 50, "preinit": True, "wait": 120}, timeout=150)
    assert r["t"] == "ok" and r["ready"] is True, r


def wait_kernel_exit(a: Agent, timeout=30) -> dict:
    return a.client.recv(lambda m: m["t"] == "kernel_exit", timeout)


def test_kernel_executes_code_through_relay(agent, tmp_path):
    workdir = tmp_path / "nb"
    workdir.mkdir()
    (workdir / "helper_mod.py").write_text("VALUE = 42\n")
    r, key = start_kernel(agent, cwd=workdir, env={"CAPSEM_TEST": "yes"})
    assert r["t"] == "ok" and r["id"] == 1 and isinstance(r["pid"], int)
    c = Client(agent, key)
    try:
        content, out = c.run("import os, helper_mod; print(os.getcwd(), os.environ['CAPSEM_TEST'], helper_mod.VALUE)")
        assert content["status"] == "ok"
        assert out.strip() == f"{workdir} yes 42"
        content, out = c.run("print('x' * 200000)")  # a bigger iopub message
        assert out == "x" * 200000 + "\n"
        content, out = c.run("1/0")
        assert content["status"] == "error" and "ZeroDivisionError" in out
        time.sleep(2.5)  # a few heartbeat periods through the relay
        assert c.kc.hb_channel.is_beating()
    finally:
        c.close()


def test_connection_file_is_private_and_key_not_on_command_lines(agent):
    r, key = start_kernel(agent)
    files = glob.glob(str(agent.rundir / "kernels" / "*" / "connection.json"))
    assert len(files) == 1
    f = Path(files[0])
    assert stat.S_IMODE(f.stat().st_mode) == 0o600
    assert stat.S_IMODE(f.parent.stat().st_mode) == 0o700
    info = json.loads(f.read_text())
    assert info["key"] == key and info["ip"] == "127.0.0.1" and info["transport"] == "tcp"
    assert info["signature_scheme"] == "hmac-sha256"
    assert len({info[f"{n}_port"] for n in ("shell", "iopub", "stdin", "control", "hb")}) == 5
    for cmdline in glob.glob("/proc/[0-9]*/cmdline"):
        try:
            assert key.encode() not in Path(cmdline).read_bytes()
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            pass
    env = Path(f"/proc/{r['pid']}/environ").read_bytes()
    assert key.encode() not in env


def test_second_kernel_start_is_refused(agent):
    r, _ = start_kernel(agent)
    assert r["t"] == "ok"
    r2, _ = start_kernel(agent, msg_id=2)
    assert r2["t"] == "error" and r2["code"] == "kernel_running" and r2["id"] == 2


def test_interrupt_kill_and_restart(agent):
    r, key = start_kernel(agent)
    c = Client(agent, key)
    try:
        exec_id = c.kc.execute("import time; time.sleep(60)")
        time.sleep(1.0)
        t0 = time.monotonic()
        assert agent.client.request({"t": "signal", "id": 5, "target": "kernel", "signum": signal.SIGINT})["t"] == "ok"
        while True:  # skip stale kernel_info replies from wait_for_ready
            reply = c.kc.get_shell_msg(timeout=20)
            if reply["parent_header"].get("msg_id") == exec_id:
                break
        assert reply["content"]["status"] == "error" and reply["content"]["ename"] == "KeyboardInterrupt"
        assert time.monotonic() - t0 < 10
        content, out = c.run("print('still alive')")
        assert out.strip() == "still alive"
    finally:
        c.close()
    agent.client.request({"t": "signal", "id": 6, "target": "kernel", "signum": signal.SIGKILL})
    ex = wait_kernel_exit(agent)
    assert ex["pid"] == r["pid"] and ex["signal"] == signal.SIGKILL and ex["code"] is None
    assert not glob.glob(str(agent.rundir / "kernels" / "*" / "connection.json"))  # cleaned up
    # a new kernel can start (a "restart")
    r2, key2 = start_kernel(agent, msg_id=7)
    assert r2["t"] == "ok" and r2["pid"] != r["pid"]
    c2 = Client(agent, key2)
    try:
        assert c2.run("print(1+1)")[1].strip() == "2"
    finally:
        c2.close()


def test_kernel_exit_reports_code_and_output_tail(agent, tmp_path):
    r, key = start_kernel(agent)
    c = Client(agent, key)
    try:
        c.kc.execute("import os; os._exit(5)")
        ex = wait_kernel_exit(agent)
    finally:
        c.close()
    assert ex["code"] == 5 and ex["signal"] is None
    assert "connection.json" in ex["tail"]  # ipykernel's startup banner went to its real stderr


def test_kernel_start_failure_reports_exit(tmp_path):
    broken = tmp_path / "broken-python"
    broken.write_text("#!/bin/sh\necho 'No module named ipykernel_launcher' >&2\nexit 3\n")
    broken.chmod(0o755)
    a = Agent(tmp_path, {"CAPSEM_AGENT_KERNEL_PYTHON": str(broken)})
    try:
        r, _ = start_kernel(a)
        assert r["t"] == "ok"
        ex = wait_kernel_exit(a)
        assert ex["code"] == 3 and "No module named ipykernel_launcher" in ex["tail"]
        r, _ = start_kernel(a, msg_id=2, cwd="/nonexistent/dir")
        assert r["t"] == "error" and r["id"] == 2
    finally:
        a.stop()


def test_relay_closes_streams_when_kernel_dies(agent):
    r, key = start_kernel(agent)
    c = Client(agent, key)
    s = open_channel(agent, "shell")
    time.sleep(0.5)
    agent.client.request({"t": "signal", "id": 2, "target": "kernel", "signum": signal.SIGKILL})
    wait_kernel_exit(agent)
    s.settimeout(10)
    while True:  # drains whatever the kernel said; must end with EOF, not a timeout
        try:
            if s.recv(65536) == b"":
                break
        except ConnectionResetError:
            break
    c.close()


def test_kernel_as_unprivileged_user(tmp_path):
    """uid drop: the kernel runs as nobody and can still read its (private) connection file.

    The host's venv Python lives under /root (0700), which nobody cannot execute, so this uses the
    stand-in echo kernel on the system Python; the real ipykernel path is the same code.
    """
    if os.getuid() != 0:
        pytest.fail("these tests run as root (the agent in the VM is root)")
    nobody = pwd.getpwnam("nobody")
    work = tempfile.mkdtemp(prefix="capsem-nobody-")
    os.chmod(work, 0o755)
    script = Path(work) / "echo_kernel.py"
    script.write_text(ECHO_KERNEL)
    wrapper = Path(work) / "fake-python"
    wrapper.write_text(f'#!/bin/sh\nshift 2\nexec /usr/bin/python3 "{script}" "$@"\n')
    wrapper.chmod(0o755)
    # pytest's tmp_path sits in a 0700 directory nobody cannot traverse: use a /run-like one
    a = Agent(tmp_path, {"CAPSEM_AGENT_KERNEL_PYTHON": str(wrapper), "CAPSEM_AGENT_RUNDIR": f"{work}/run"})
    a.rundir = Path(work) / "run"
    try:
        r, key = start_kernel(a, cwd=work, uid=nobody.pw_uid)
        assert r["t"] == "ok", r
        conn = glob.glob(str(a.rundir / "kernels" / "*" / "connection.json"))[0]
        assert os.stat(conn).st_uid == nobody.pw_uid
        s = open_channel(a, "shell")
        s.settimeout(20)
        s.sendall(b"ping")
        assert s.recv(10) == b"ping"  # so the kernel read its ports from the connection file
        status = Path(f"/proc/{r['pid']}/status").read_text()
        uids = next(line for line in status.splitlines() if line.startswith("Uid:")).split()[1:]
        gids = next(line for line in status.splitlines() if line.startswith("Gid:")).split()[1:]
        groups = next(line for line in status.splitlines() if line.startswith("Groups:")).split()[1:]
        assert set(uids) == {str(nobody.pw_uid)} and set(gids) == {str(nobody.pw_gid)} and groups == []
    finally:
        a.stop()


@pytest.mark.parametrize("how", ["boot_env", "request"])
def test_warm_kernel_start(tmp_path, how):
    a = Agent(tmp_path, {"CAPSEM_AGENT_PREWARM": "1"} if how == "boot_env" else None)
    try:
        if how == "request":
            assert a.client.request({"t": "kernel_prewarm", "id": 50})["t"] == "ok"
        time.sleep(2.0)  # let it import
        t0 = time.monotonic()
        r, key = start_kernel(a)
        assert r["t"] == "ok" and r["warm"] is True
        c = Client(a, key)
        ready = time.monotonic() - t0
        try:
            content, out = c.run("import os, sys; print(os.getcwd(), sys.argv[0].endswith('ipykernel_launcher'))")
            assert out.strip() == f"{a.tmp} True"
            assert_loaded_without_debugpy(c)
        finally:
            c.close()
        print(f"warm kernel_start -> ready: {ready:.3f}s")
    finally:
        a.stop()


def test_preinit_kernel_takes_the_real_key_cwd_and_env(tmp_path):
    """kernel_prewarm {preinit}: the kernel app is initialised before the key exists (a pooled VM);
    kernel_start then gives it the real key (a client signing with it works), cwd and env."""
    a = Agent(tmp_path)
    try:
        prewarm_preinit(a)
        conn = glob.glob(str(a.rundir / "kernels" / "*" / "connection.json"))
        assert len(conn) == 1
        placeholder = json.loads(Path(conn[0]).read_text())["key"]
        t0 = time.monotonic()
        r, key = start_kernel(a, env={"CAPSEM_TEST_VAR": "from-the-host"})
        assert r["t"] == "ok" and r["warm"] is True and r["listening"] is True
        assert placeholder != key and json.loads(Path(conn[0]).read_text())["key"] == key
        c = Client(a, key)
        ready = time.monotonic() - t0
        try:
            _, out = c.run("import os; print(os.getcwd(), os.environ.get('CAPSEM_TEST_VAR'), "
                           "os.environ.get('MPLBACKEND', '').startswith('module://'))")
            assert out.strip() == f"{a.tmp} from-the-host True"
            # the throw-away key the kernel started with (and answered its own warm-up with) is dead
            fw = ChannelForwarder(a.channels_path)
            stale = BlockingKernelClient()
            stale.load_connection_info(fw.connection_info(placeholder))
            stale.start_channels(hb=False)
            try:
                stale.kernel_info()
                with pytest.raises(queue.Empty):
                    stale.get_shell_msg(timeout=5)
            finally:
                stale.stop_channels()
                fw.close()
            _, out = c.run("print('still here')")  # and the real client is unaffected
            assert out.strip() == "still here"
            assert_loaded_without_debugpy(c)
        finally:
            c.close()
        print(f"preinit kernel_start -> ready: {ready:.3f}s")
    finally:
        a.stop()


def test_preinit_kernel_started_before_its_warm_up_ends(tmp_path):
    """A cold VM's kernel_start can come while the preinit process is still importing (boot-time
    capsem.prewarm=preinit): the reply does not claim it listens, and the relay holds the host's
    channels until the kernel has taken the real key, so the first kernel_info is answered."""
    a = Agent(tmp_path)
    try:
        r = a.client.request({"t": "kernel_prewarm", "id": 50, "preinit": True}, timeout=30)
        assert r["t"] == "ok" and "ready" not in r
        r, key = start_kernel(a)
        assert r["t"] == "ok" and r["warm"] is True and r["listening"] is False
        c = Client(a, key)
        try:
            _, out = c.run("import os; print(os.getcwd())")
            assert out.strip() == str(a.tmp)
        finally:
            c.close()
    finally:
        a.stop()


def test_preinit_kernel_that_cannot_take_its_parameters_exits(tmp_path):
    """A running pre-started kernel that fails to apply what kernel_start sent (here a signature
    scheme the agent's format check lets through but no hash library has) must not stay up with
    its throw-away key: it exits, and the host gets kernel_exit with the reason. The reply came
    before (it does not wait for the kernel's acknowledgement), but a channel connected meanwhile
    never reaches that kernel: the relay closes it."""
    a = Agent(tmp_path)
    try:
        prewarm_preinit(a)
        t0 = time.monotonic()
        r = a.client.request({"t": "kernel_start", "id": 1, "key": secrets.token_hex(32),
                              "signature_scheme": "hmac-nosuchhash", "cwd": str(a.tmp)}, timeout=60)
        assert r["t"] == "ok" and r["warm"] is True and r["listening"] is True
        assert time.monotonic() - t0 < 8
        shell = open_channel(a, "shell")
        ex = wait_kernel_exit(a)
        assert ex["code"] == 1 and "could not take its parameters" in ex["tail"], ex
        assert closed_by_agent(shell), "a stream was carried to the kernel that kept its throw-away key"
    finally:
        a.stop()


def test_held_kernel_answers_kernel_info_and_runs_the_rest_in_its_folder_once_released(tmp_path):
    """kernel_start {hold} (a pooled VM's folder still being attached): the key is taken at once,
    kernel_info is answered, every other shell request waits, in order, until kernel_release,
    which needs the cwd to exist by then and changes into it."""
    a = Agent(tmp_path)
    folder = tmp_path / "attached-later"
    try:
        prewarm_preinit(a)
        r, key = start_kernel(a, cwd=folder, hold=True)
        assert r["t"] == "ok" and r["warm"] is True and r["listening"] is True, r
        c = Client(a, key)  # waits for a kernel_info_reply: not held
        try:
            first = c.kc.execute("import os; print(os.getcwd())")
            second = c.kc.execute("print('second')")
            with pytest.raises(queue.Empty):
                c.kc.get_shell_msg(timeout=3)
            c.kc.kernel_info()  # queued behind the held requests: the kernel handles one at a time
            r = a.client.request({"t": "kernel_release", "id": 2}, timeout=30)
            assert r["t"] == "error" and r["code"] == "os_error" and "does not exist" in r["message"], r
            with pytest.raises(queue.Empty):
                c.kc.get_shell_msg(timeout=1)
            folder.mkdir()
            assert a.client.request({"t": "kernel_release", "id": 3}, timeout=30)["t"] == "ok"
            replies = [c.kc.get_shell_msg(timeout=30) for _ in range(3)]
            assert [m["parent_header"]["msg_id"] for m in replies[:2]] == [first, second]
            assert [m["content"]["status"] for m in replies] == ["ok", "ok", "ok"]
            assert replies[2]["msg_type"] == "kernel_info_reply"
            out = []
            while True:
                m = c.kc.get_iopub_msg(timeout=10)
                if m["msg_type"] == "stream":
                    out.append(m["content"]["text"])
                if m["msg_type"] == "status" and m["parent_header"].get("msg_id") == second \
                        and m["content"]["execution_state"] == "idle":
                    break
            assert "".join(out).split() == [str(folder), "second"]
            r = a.client.request({"t": "kernel_release", "id": 4}, timeout=30)
            assert r["t"] == "error" and r["code"] == "not_held", r
        finally:
            c.close()
    finally:
        a.stop()


def test_warm_up_leaves_no_trace_and_the_users_first_cell_is_in_1(tmp_path):
    """The pre-started kernel runs a first cell of its own before the claim (preinit_kernel's
    FIRST_CELL_WARM_UP, so the user's first cell does not pay first-time costs). The user sees
    none of it: their first cell, sent at once while the kernel is held, runs in the folder with
    its files visible and is In[1] / execution_count 1; In, Out, _, _i*, the namespace and the
    history database hold nothing of the warm-up."""
    from capsem_agent.preinit_kernel import FIRST_CELL_WARM_UP
    a = Agent(tmp_path)
    folder = tmp_path / "notebook"
    try:
        prewarm_preinit(a)
        r, key = start_kernel(a, cwd=folder, hold=True)
        assert r["t"] == "ok" and r["warm"] is True, r
        folder.mkdir()
        (folder / "data.txt").write_text("from the host")
        c = Client(a, key)
        try:
            first = c.kc.execute("import os", user_expressions={
                "cwd": "os.getcwd()", "files": "os.listdir()", "In": "In", "Out": "Out", "under": "_",
                "names": "sorted(k for k in globals() if not k.startswith('_'))",
                "inputs": "sorted(k for k in globals() if k.startswith('_i'))"})
            assert a.client.request({"t": "kernel_release", "id": 3}, timeout=30)["t"] == "ok"
            reply = c.kc.get_shell_msg(timeout=60)
            assert reply["parent_header"]["msg_id"] == first
            content = reply["content"]
            assert content["status"] == "ok" and content["execution_count"] == 1, content
            got = {k: v["data"]["text/plain"] for k, v in content["user_expressions"].items()}
            assert got["cwd"] == repr(str(folder)) and got["files"] == "['data.txt']", got
            assert got["In"] == "['', 'import os']" and got["Out"] == "{}" and got["under"] == "''", got
            assert got["inputs"] == "['_i', '_i1', '_ih', '_ii', '_iii']", got
            assert "print" not in got["names"] and FIRST_CELL_WARM_UP["code"] not in str(got), got
            c.kc.history(hist_access_type="range", session=0, start=0, raw=True, output=False)  # this session
            hist = c.kc.get_shell_msg(timeout=60)
            assert hist["msg_type"] == "history_reply", hist
            assert [line[1:] for line in hist["content"]["history"]] == [[0, ""], [1, "import os"]], hist["content"]
            content, out = c.run("print(len(In), _i1)")
            assert content["execution_count"] == 2 and out.split() == ["3", "import", "os"], (content, out)
        finally:
            c.close()
    finally:
        a.stop()


def test_hold_without_a_preinit_kernel_is_refused_and_changes_nothing(agent):
    r, _ = start_kernel(agent, cwd="/nonexistent-yet", hold=True)
    assert r["t"] == "error" and r["code"] == "cannot_hold", r
    r = agent.client.request({"t": "kernel_release", "id": 2}, timeout=30)
    assert r["t"] == "error" and r["code"] == "no_kernel", r
    r, key = start_kernel(agent, msg_id=3)  # the fallback: start without hold once the cwd exists
    assert r["t"] == "ok", r
    c = Client(agent, key)
    try:
        _, out = c.run("import os; print(os.getcwd())")
        assert out.strip() == str(agent.tmp)
    finally:
        c.close()


def _kernel_side_peers(ports: dict[str, int]) -> dict[str, set[int]]:
    """For each kernel port: the peer ports of its established TCP connections (from /proc/net/tcp)."""
    by_port = {port: name for name, port in ports.items()}
    peers: dict[str, set[int]] = {name: set() for name in ports}
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, remote, state = line.split()[1:4]
        port = int(local.split(":")[1], 16)
        if state == "01" and port in by_port:
            peers[by_port[port]].add(int(remote.split(":")[1], 16))
    return peers


@pytest.mark.slow  # waits 35 s, past ZMQ's 30 s handshake interval
def test_first_streams_use_the_spare_connections_made_before_the_claim(tmp_path):
    """The agent connects to a pre-started kernel's five ports once it is warm (SpareConnections);
    the host's first stream on each channel is paired with that connection instead of a new one.
    They must survive an idle pool VM's wait: here longer than ZMQ's default 30 s handshake
    interval, which the pre-started kernel turns off."""
    a = Agent(tmp_path)
    try:
        prewarm_preinit(a)
        conn = json.loads(Path(glob.glob(str(a.rundir / "kernels" / "*" / "connection.json"))[0]).read_text())
        ports = {name: conn[f"{name}_port"] for name in ("shell", "iopub", "stdin", "control", "hb")}
        spares = _kernel_side_peers(ports)  # (shell also has the kernel's own debugger socket)
        assert all(spares.values()), spares
        time.sleep(35)
        assert _kernel_side_peers(ports) == spares, "the kernel dropped the idle spare connections"
        r, key = start_kernel(a)
        assert r["t"] == "ok" and r["listening"] is True
        c = Client(a, key)
        try:
            _, out = c.run("print('through the spares')")
            assert out.strip() == "through the spares"
            c.kc.control_channel.send(c.kc.session.msg("kernel_info_request"))
            assert c.kc.get_control_msg(timeout=30)["msg_type"] == "kernel_info_reply"
            assert c.kc.is_alive()
            assert _kernel_side_peers(ports) == spares, "the first streams made new connections"
        finally:
            c.close()
    finally:
        a.stop()


@pytest.mark.parametrize("env", [{"PYTHONPATH": "/nonexistent"}, {"JUPYTER_CONFIG_DIR": "/nonexistent"}])
def test_preinit_kernel_discarded_for_env_read_at_init(tmp_path, env):
    a = Agent(tmp_path)
    try:
        prewarm_preinit(a)
        r, key = start_kernel(a, env=env)
        assert r["t"] == "ok" and r["warm"] is False
        assert len(glob.glob(str(a.rundir / "kernels" / "*"))) == 1  # the preinit one's dir is gone
    finally:
        a.stop()


def test_warm_kernel_skipped_when_python_env_differs(tmp_path):
    a = Agent(tmp_path, {"CAPSEM_AGENT_PREWARM": "1"})
    try:
        r, key = start_kernel(a, env={"PYTHONPATH": str(tmp_path)})
        assert r["t"] == "ok" and r["warm"] is False
    finally:
        a.stop()


@pytest.mark.parametrize("mode", ["warm", "preinit"])
def test_pre_started_kernel_does_not_see_the_agents_path_or_modules(tmp_path, mode):
    """The bootstrap (`python -m capsem_agent.warm_kernel`/`preinit_kernel`, found through a
    PYTHONPATH set for that start only) leaves no trace in the kernel: no agent directory or
    launch directory on sys.path, no PYTHONPATH, no capsem_agent module."""
    a = Agent(tmp_path)
    try:
        if mode == "warm":
            assert a.client.request({"t": "kernel_prewarm", "id": 50, "wait": 120}, timeout=150)["t"] == "ok"
        else:
            prewarm_preinit(a)
        r, key = start_kernel(a)
        assert r["t"] == "ok" and r["warm"] is True, r
        c = Client(a, key)
        try:
            _, out = c.run("import os, sys; print(repr((sys.path, os.environ.get('PYTHONPATH'), "
                           "sorted(m for m in sys.modules if m.startswith('capsem_agent')))))")
        finally:
            c.close()
        path, pythonpath, modules = eval(out)
        agent_root = str(Path(__file__).resolve().parents[1] / "guest-agent")
        assert agent_root not in path and "/" not in path and pythonpath is None and modules == [], out
    finally:
        a.stop()


# --- relay mechanics with a stand-in echo kernel ---------------------------------------------

def _agent_with_echo_kernel(tmp_path) -> Agent:
    script = tmp_path / "echo_kernel.py"
    script.write_text(ECHO_KERNEL)
    wrapper = tmp_path / "fake-python"
    wrapper.write_text(f'#!/bin/sh\nshift 2\nexec "{sys.executable}" "{script}" "$@"\n')  # drop -m ipykernel_launcher
    wrapper.chmod(0o755)
    return Agent(tmp_path, {"CAPSEM_AGENT_KERNEL_PYTHON": str(wrapper)})


@pytest.fixture
def echo_agent(tmp_path):
    a = _agent_with_echo_kernel(tmp_path)
    r, _ = start_kernel(a)
    assert r["t"] == "ok"
    yield a
    a.stop()


def _zmtp_frame(body: bytes, more: bool = False, command: bool = False) -> bytes:
    flags = (0x01 if more else 0) | (0x04 if command else 0)
    if len(body) > 255:
        return bytes([flags | 0x02]) + struct.pack(">Q", len(body)) + body
    return bytes([flags, len(body)]) + body


def _zmtp_ready(socket_type: bytes, identity: bytes) -> bytes:
    props = b"".join(bytes([len(k)]) + k + struct.pack(">I", len(v)) + v
                     for k, v in ((b"Socket-Type", socket_type), (b"Identity", identity)))
    return _zmtp_frame(b"\x05READY" + props, command=True)


def _open_primed(a: Agent, name: str) -> socket.socket:
    """What a pooled VM's keeper opens before the claim (capsem_vm.pool.keeper)."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(a.channels_path)
    s.sendall(protocol.encode({"t": "channel", "name": name, "prime": True}) + protocol.ZMTP_GREETING)
    s.settimeout(30)
    return s


def _recv_until(s: socket.socket, marker: bytes, timeout: float = 60) -> bytes:
    got = b""
    deadline = time.monotonic() + timeout
    while marker not in got:
        s.settimeout(max(0.1, deadline - time.monotonic()))
        data = s.recv(65536)
        assert data, f"closed before {marker!r}; got {got!r}"
        got += data
    return got


def test_primed_stream_finishes_the_kernels_handshake_before_the_claim_and_holds_the_rest_for_the_key(tmp_path):
    """A pooled VM's keeper primes one stream per channel: the agent joins it to the pre-started
    kernel's spare connection and passes the ZMTP greeting, so the kernel's greeting and READY
    come back before any kernel_start. What the front end sends next (its READY, a request
    signed with the real key) waits until the kernel took that key: passed earlier, the kernel
    (still on its throw-away key) would drop the request as badly signed. Without a warm
    pre-started kernel, or once a kernel was started, a primed stream is closed."""
    from jupyter_client.session import Session
    a = Agent(tmp_path)
    try:
        early = _open_primed(a, "shell")  # nothing pre-started yet
        assert closed_by_agent(early)
        prewarm_preinit(a)
        conn = json.loads(Path(glob.glob(str(a.rundir / "kernels" / "*" / "connection.json"))[0]).read_text())
        ports = {name: conn[f"{name}_port"] for name in ("shell", "iopub", "stdin", "control", "hb")}
        spares = _kernel_side_peers(ports)
        shell = _open_primed(a, "shell")
        got = _recv_until(shell, b"ROUTER")
        assert got[:1] == b"\xff" and got[10:16] == b"\x03\x01NULL" and b"\x05READY" in got[64:]
        key = secrets.token_hex(32)
        frames = Session(key=key.encode(), signature_scheme="hmac-sha256").serialize(
            Session().msg("kernel_info_request"))
        shell.sendall(_zmtp_ready(b"DEALER", b"front-end-id")
                      + b"".join(_zmtp_frame(f, more=i < len(frames) - 1) for i, f in enumerate(frames)))
        shell.settimeout(2)
        with pytest.raises(socket.timeout):  # held: no reply before the key
            shell.recv(1)
        r, _ = start_kernel(a, key=key)
        assert r["t"] == "ok" and r["listening"] is True
        reply = _recv_until(shell, b"kernel_info_reply")
        assert reply.startswith(_zmtp_frame(b"<IDS|MSG>", more=True))  # (the kernel's ROUTER routed it by our identity)
        assert _kernel_side_peers(ports)["shell"] == spares["shell"], "not carried by the spare connection"
        late = _open_primed(a, "iopub")  # a kernel was started: no more priming
        assert closed_by_agent(late)
    finally:
        a.stop()


def _echo_ports(a: Agent) -> dict:
    return json.loads(Path(glob.glob(str(a.rundir / "kernels" / "*" / "connection.json"))[0]).read_text())


def _rtts(s: socket.socket, n: int, size: int = 64) -> list[float]:
    msg = b"p" * size
    times = []
    for _ in range(n):
        t = time.perf_counter()
        s.sendall(msg)
        got = 0
        while got < size:
            got += len(s.recv(size - got))
        times.append(time.perf_counter() - t)
    return times


@pytest.mark.serial  # a sub-millisecond bound: no second test worker beside it (make unit)
def test_relay_latency_added_per_round_trip(echo_agent):
    s = open_channel(echo_agent, "hb")
    s.settimeout(10)
    _rtts(s, 50)  # warm up (the first connect may wait for the kernel to listen)
    d = socket.create_connection(("127.0.0.1", _echo_ports(echo_agent)["hb_port"]))
    d.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    relay = statistics.median(_rtts(s, 1000))
    direct = statistics.median(_rtts(d, 1000))
    added_ms = (relay - direct) * 1000
    print(f"relay median RTT {relay * 1e6:.0f} us, direct {direct * 1e6:.0f} us, added {added_ms * 1000:.0f} us")
    assert added_ms < 0.5


def test_relay_bulk_byte_exact_and_half_close(echo_agent):
    s = open_channel(echo_agent, "shell")
    payload = os.urandom(16 * 1024 * 1024)
    received = bytearray()

    def reader():
        while True:
            d = s.recv(1 << 20)
            if not d:
                return
            received.extend(d)
    t = threading.Thread(target=reader)
    t.start()
    t0 = time.monotonic()
    s.sendall(payload)
    s.shutdown(socket.SHUT_WR)  # half-close travels to the kernel, whose close travels back
    t.join(60)
    assert not t.is_alive()
    print(f"relay echo throughput {len(payload) / (time.monotonic() - t0) / 1e6:.0f} MB/s")
    assert bytes(received) == payload


def test_relay_all_channels_independent(echo_agent):
    socks = {name: open_channel(echo_agent, name) for name in ("shell", "iopub", "stdin", "control", "hb")}
    for name, s in socks.items():
        s.settimeout(10)
        s.sendall(name.encode())
    for name, s in socks.items():
        assert s.recv(100) == name.encode()


def test_bytes_right_behind_channel_frame_are_relayed(echo_agent):
    from capsem_agent import protocol
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(echo_agent.channels_path)
    s.sendall(protocol.encode({"t": "channel", "name": "control"}) + b"early bytes")
    s.settimeout(10)
    got = b""
    while len(got) < len(b"early bytes"):
        got += s.recv(100)
    assert got == b"early bytes"
