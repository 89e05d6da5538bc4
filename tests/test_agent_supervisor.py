"""The PID-1 path of the agent, run as PID 1 of fresh PID/mount/UTS/net namespaces on the host.

Inside the namespaces the supervisor does its real work (mounts, hostname, loopback, reaping,
power-off); reboot(2) from a non-initial PID namespace only ends that namespace's init, so the
host is safe. Sockets live in /var/tmp because the supervisor mounts a tmpfs over /tmp.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time

import pytest

from capsem_agent import protocol
from agent_harness import LAUNCHER, AgentClient


@pytest.fixture
def pid1_agent():
    if os.getuid() != 0 or not shutil.which("unshare"):
        pytest.fail("needs root and unshare(1) (both present on the project's machines)")
    d = tempfile.mkdtemp(prefix="capsem-pid1-", dir="/var/tmp")
    ctl = os.path.join(d, "ctl.sock")
    ls = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    ls.bind(ctl)
    ls.listen(1)
    env = dict(os.environ, CAPSEM_AGENT_CONNECT=f"unix:{ctl}",
               CAPSEM_AGENT_CHANNELS_LISTEN=f"unix:{d}/chan.sock")
    env.pop("CAPSEM_AGENT_RUNDIR", None)
    env["PATH"] = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"  # as in a guest
    # The supervisor mounts a tmpfs over /tmp: a checkout under /tmp would vanish under it, so run
    # a copy of the agent from /var/tmp.
    agent_dir = shutil.copytree(LAUNCHER.parent, os.path.join(d, "agent"),
                                ignore=shutil.ignore_patterns("__pycache__"))
    launcher = os.path.join(agent_dir, LAUNCHER.name)
    proc = subprocess.Popen(["unshare", "--pid", "--fork", "--mount", "--uts", "--net", "--mount-proc",
                             sys.executable, "-I", launcher], env=env,
                            stderr=open(os.path.join(d, "stderr"), "wb"))
    ls.settimeout(30)
    conn, _ = ls.accept()
    client = AgentClient(conn)
    hello = client.recv(timeout=30)
    assert hello["t"] == "hello"
    yield proc, client, d
    if proc.poll() is None:
        proc.kill()
        proc.wait()
    conn.close()
    ls.close()
    print(open(os.path.join(d, "stderr")).read())
    shutil.rmtree(d, ignore_errors=True)


def test_pid1_environment(pid1_agent):
    proc, c, _ = pid1_agent
    ex, out, err = c.run(1, ["sh", "-c", "echo $$; hostname; cat /proc/1/cmdline | tr '\\0' ' '; echo; "
                                          "grep -E ' /(tmp|run) ' /proc/mounts | cut -d' ' -f2,3 | sort; "
                                          "ls -d /dev/fd"])
    lines = out.decode().splitlines()
    assert ex["code"] == 0, err
    assert lines[1] == "capsem"
    assert "capsem-agent" in lines[2]
    assert "/run tmpfs" in lines and "/tmp tmpfs" in lines
    assert "/dev/fd" in lines
    # loopback is up: ipykernel needs to bind and connect on 127.0.0.1
    code = ("import socket; s=socket.socket(); s.bind(('127.0.0.1',0)); s.listen(1); "
            "c=socket.create_connection(s.getsockname(), timeout=2); print('lo ok')")
    ex, out, err = c.run(2, [os.path.realpath(sys.executable), "-c", code])  # not a venv link under /tmp
    assert out.strip() == b"lo ok", err


def test_pid1_reaps_orphans_and_ignores_signals(pid1_agent):
    proc, c, _ = pid1_agent
    # orphans: grandchildren that exit after their parent are reparented to PID 1
    ex, _, _ = c.run(1, ["sh", "-c", "for i in 1 2 3 4 5; do (sleep 0.2 &) ; done; exit 0"])
    time.sleep(1.0)
    ex, out, _ = c.run(2, ["sh", "-c", "grep -l '^State:.*Z' /proc/[0-9]*/status 2>/dev/null | wc -l"])
    assert out.strip() == b"0"
    # signals PID 1 must survive (sent from inside its namespace)
    ex, _, _ = c.run(3, ["sh", "-c", "kill -TERM 1; kill -INT 1; kill -HUP 1; kill -USR1 1; sleep 0.3"])
    assert c.request({"t": "ping", "id": 4}) == {"t": "pong", "id": 4}
    assert proc.poll() is None


def test_pid1_powers_off_when_service_ends(pid1_agent):
    proc, c, _ = pid1_agent
    c.send({"t": "exec", "id": 1, "argv": ["sleep", "300"]})  # must not keep the VM up
    assert c.recv(lambda m: m.get("id") == 1)["t"] == "started"
    assert c.request({"t": "shutdown", "id": 2}) == {"t": "ok", "id": 2}
    t0 = time.monotonic()
    proc.wait(20)  # PID 1 called reboot(POWER_OFF): in a PID namespace that ends the namespace
    assert time.monotonic() - t0 < 15


def test_pid1_powers_off_when_host_disconnects(pid1_agent):
    proc, c, _ = pid1_agent
    c.sock.close()
    proc.wait(20)


def test_pid1_survives_service_crash_by_powering_off(pid1_agent):
    proc, c, _ = pid1_agent
    c.send_raw(b"\xff\xff\xff\xff")  # unframeable: the service closes the connection and ends
    assert c.recv(timeout=10)["code"] == "bad_frame"
    proc.wait(20)
