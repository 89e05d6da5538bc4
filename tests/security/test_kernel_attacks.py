"""Attacks from inside a real capsem kernel, started the way Jupyter starts it (KernelManager ->
CapsemProvisioner, kernelspec from `capsem kernel install`, egress on with the default deny-all
policy). One kernel VM for the module, plus the fresh one its restart boots.

- host secrets (the Jupyter token, a credential in the server's environment, the CA key) are
  nowhere the guest can look;
- every vsock port on the host CID from the kernel's VM: only 5000 (drops extra connections), 5002
  and 5003 answer, and the refusals are in the audit log;
- an iopub flood to a client that does not read leaves host memory flat;
- bytes the kernel injects into its own iopub connection that break ZMTP limits are cut by the
  host, and the channel recovers;
- a memory bomb and a fork bomb leave the host responsive, and the restarted kernel works.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import sqlite3
import subprocess
import threading
import time
from pathlib import Path

import pytest

import guest_scripts as gs
from kernel_helpers import KERNEL, cell_json, run_ok, start_kernel, stop_kernel, vm_exec

from capsem_kernel import loop_thread

pytestmark = pytest.mark.vm


class Env:
    pass


@pytest.fixture(scope="module")
def k(capsem_kernelspecs, tmp_path_factory):
    e = Env()
    e.nb = tmp_path_factory.mktemp("seckernel") / "notebook"
    e.nb.mkdir()
    e.token = secrets.token_hex(24)
    e.cred = "sk-live-" + secrets.token_hex(20)
    env = dict(os.environ, JUPYTER_TOKEN=e.token, OPENAI_API_KEY=e.cred, JPY_SESSION_NAME="attack.ipynb")
    from capsem_vm.proxy.ca import ensure_ca
    pem = ensure_ca().key_and_cert.read_text()
    body = pem.split("-----BEGIN PRIVATE KEY-----")[1].split("-----END PRIVATE KEY-----")[0].split()
    e.ca_needle = body[len(body) // 2]
    e.km, e.kc = start_kernel(KERNEL, cwd=e.nb, env=env)
    try:
        e.kvm = e.km.provisioner.kernel_vm
        e.vm = e.kvm.vm
        print(f"\nkernel start {e.km.capsem_start_s:.1f} s")
        yield e
    finally:
        stop_kernel(e.km, e.kc)


def sh(e, script: str | list[str], timeout: float = 300) -> tuple[int, str, str]:
    """A command in the kernel's VM through the control connection (a shell script or an argv)."""
    argv = ["sh", "-c", script] if isinstance(script, str) else script
    return vm_exec(e.vm, argv, timeout)


def test_host_secrets_are_nowhere_in_the_guest(k):
    """The server's token, a credential in its environment and the CA private key: not in the
    kernel's environment, any process's environment or command line, the kernel command line,
    the guest's writable files or the notebook folder. (The CA key is also searched in guest
    memory by tests/test_egress_vm.py::test_ca_private_key_absent_from_guest.)"""
    # the needles travel in halves: the cell's source lands in IPython's history file
    halves = [(n[: len(n) // 2], n[len(n) // 2:]) for n in (k.token, k.cred, k.ca_needle)]
    code = gs.FIND_TOKEN + (
        "import json\n"
        f"print(json.dumps([find_token(a + b, ({str(k.nb)!r},)) for a, b in {halves!r}]))\n")
    found = cell_json(k.kc, code)
    assert found == [[], [], []], found
    env = cell_json(k.kc, "import os, json; print(json.dumps(sorted(os.environ)))")
    assert "JUPYTER_TOKEN" not in env and "OPENAI_API_KEY" not in env


def test_guest_network_is_loopback_and_a_dummy_device(k):
    """No NIC: with egress the guest has `lo` and the dummy `capsem0` (a virtual device that only
    carries the default route to the nftables capture; tests/test_egress_vm.py shows nothing
    leaves through it but via the proxy)."""
    code, out, err = sh(k, "for d in /sys/class/net/*; do echo $(basename $d) $(readlink -f $d); done")
    assert code == 0, err
    devices = dict(line.split() for line in out.splitlines())
    assert sorted(devices) == ["capsem0", "lo"], devices
    assert all("/devices/virtual/net/" in path for path in devices.values()), devices


def _audit_rows(kernel_id: str) -> list[dict]:
    from capsem_vm.egress_runtime import process_runtime
    audit = process_runtime().audit  # the provisioners' runtime
    audit.flush()
    con = sqlite3.connect(audit.db_path)
    con.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in con.execute("SELECT * FROM events WHERE kernel = ?", (kernel_id,))]
    finally:
        con.close()


@pytest.mark.timeout(1800)
def test_vsock_scan_from_a_kernel_vm_finds_only_the_documented_ports(k):
    code, out, err = sh(k, ["python3", "-c", gs.PORT_SCAN, "2", "0", "65535", "10"], timeout=1500)
    assert code == 0, err
    scan = json.loads(out.strip().splitlines()[-1])
    print(f"\nscan: {scan['seconds']} s, errors {scan['errors']}, behaviour {scan['behaviour']}")
    assert scan["accepted"] == [5000, 5002, 5003], scan
    assert scan["timed_out"] == 0
    assert scan["behaviour"]["5000"] in ("eof", "ECONNRESET", "EPIPE")
    for port in ("5002", "5003"):  # the bridge answers a bad first frame with a refusal/error frame
        assert scan["behaviour"][port].startswith("data:") or scan["behaviour"][port] == "eof", scan
    rows = _audit_rows(k.vm.egress.kernel_id)
    rules = {r["rule"] for r in rows if r["decision"] == "deny"}
    assert {"control-port", "protocol"} <= rules, rules
    loop_thread.run_sync(k.vm.control.ping(), 30)


def _rss_mb(pid: int | None = None) -> float:
    with open(f"/proc/{pid or 'self'}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


@pytest.mark.timeout(1200)
def test_iopub_flood_to_a_stalled_client_leaves_host_memory_flat(k):
    import zmq
    info = k.km.get_connection_info()
    stalled = zmq.Context.instance().socket(zmq.SUB)
    stalled.setsockopt(zmq.RCVHWM, 2)
    stalled.setsockopt(zmq.SUBSCRIBE, b"")
    stalled.connect(f"tcp://{info['ip']}:{info['iopub_port']}")
    time.sleep(2)
    base = _rss_mb()
    peak = [base]
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], _rss_mb())
            time.sleep(0.2)
    t = threading.Thread(target=sample, daemon=True)
    t.start()
    t0 = time.monotonic()
    try:
        total, tail, reply = _drain(k.kc, "import sys\nfor i in range(300):\n    sys.stdout.write('x' * 1_000_000 + '\\n')\n"
                                          "    sys.stdout.flush()\nprint('flood done')", timeout=900)
    finally:
        stop.set()
        t.join()
        stalled.close(0)
    seconds = time.monotonic() - t0
    print(f"\niopub flood: {total >> 20} MiB to the reading client in {seconds:.0f} s; "
          f"host RSS {base:.0f} -> peak {peak[0]:.0f} MB")
    assert reply["content"]["status"] == "ok" and "flood done" in tail and total > 250 << 20
    assert peak[0] - base < 200, f"host RSS grew by {peak[0] - base:.0f} MB"
    assert k.kvm.forwarder.violations == []


def _drain(kc, code: str, timeout: float) -> tuple[int, str, dict]:
    """Execute `code`, reading (and dropping) its iopub output as it comes, like a front end that
    keeps up: (stream bytes seen, the last text, the shell reply)."""
    msg_id = kc.execute(code)
    total, tail = 0, ""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            msg = kc.get_iopub_msg(timeout=1)
        except Exception:  # queue.Empty
            continue
        if msg["parent_header"].get("msg_id") != msg_id:
            continue
        if msg["msg_type"] == "stream":
            total += len(msg["content"]["text"])
            tail = (tail + msg["content"]["text"])[-200:]
        elif msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
            break
        del msg
    return total, tail, kc.get_shell_msg(timeout=60)


INJECT = r"""
import json, os, socket
from ipykernel.kernelapp import IPKernelApp
port = IPKernelApp.instance().iopub_port
inodes = set()
with open("/proc/net/tcp") as f:
    for line in f.readlines()[1:]:
        parts = line.split()
        if int(parts[1].split(":")[1], 16) == port and parts[3] == "01":
            inodes.add(parts[9])
hit = 0
for fd in os.listdir("/proc/self/fd"):
    try:
        link = os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        continue
    if link.startswith("socket:[") and link[8:-1] in inodes:
        os.write(int(fd), b"\xff" * 65536)  # any header the host reads here breaks ZMTP limits
        hit += 1
open("inject.json", "w").write(json.dumps({"port": port, "connections": hit}))
"""


def test_zmtp_bytes_injected_by_the_kernel_are_cut_and_the_channel_recovers(k):
    before = len(k.kvm.forwarder.violations)
    # the cell's own iopub output dies with the stream it breaks: wait for the shell reply only
    msg_id = k.kc.execute(INJECT)
    while True:
        reply = k.kc.get_shell_msg(timeout=120)
        if reply["parent_header"].get("msg_id") == msg_id:
            break
    assert reply["content"]["status"] == "ok", reply["content"]
    res = json.loads((k.nb / "inject.json").read_text())
    assert res["connections"] >= 1, res
    deadline = time.monotonic() + 60
    while len(k.kvm.forwarder.violations) == before:
        assert time.monotonic() < deadline, "the host never cut the stream"
        time.sleep(0.2)
    assert "iopub" in k.kvm.forwarder.violations[-1]
    # ZMQ reconnects the client's iopub; a new stream works again
    deadline = time.monotonic() + 120
    while True:
        try:
            if "alive" in run_ok(k.kc, "print('alive')", timeout=20):
                break
        except (AssertionError, Exception):
            pass
        assert time.monotonic() < deadline, "iopub did not recover"


def _host_latency(duration: float) -> float:
    """Worst delay of a 50 ms host timer and of the capsem loop thread over `duration` s."""
    worst = 0.0
    end = time.monotonic() + duration
    while time.monotonic() < end:
        t = time.monotonic()
        time.sleep(0.05)
        loop_thread.run_sync(asyncio.sleep(0), 30)
        worst = max(worst, time.monotonic() - t - 0.05)
    return worst


@pytest.mark.timeout(1800)
def test_memory_bomb_then_fork_bomb_leave_the_host_responsive_and_a_restart_works(k):
    qemu = k.vm.qemu.pid
    memory_mb = k.vm.config.memory_mb
    code, out, err = sh(k, ["python3", "-c", "x = []\nwhile True:\n    x.append(bytearray(50 << 20))"], timeout=600)
    assert code == 128 + 9, (code, out, err)  # SIGKILLed by the guest's OOM killer
    assert _rss_mb(qemu) < memory_mb + 600
    lat = _host_latency(5)
    print(f"\nafter the memory bomb: QEMU RSS {_rss_mb(qemu):.0f} MB, worst host delay {lat * 1000:.0f} ms")
    run_ok(k.kc, "print(1 + 1)")  # the kernel survived (or the OOM killer took only the hog)

    bomb = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"
    (k.nb / "bomb.py").write_text(bomb)
    code, out, err = sh(k, f"nohup python3 {k.nb}/bomb.py >/dev/null 2>&1 & echo started", timeout=120)
    assert "started" in out
    lat = _host_latency(30)
    rss = _rss_mb(qemu) if Path(f"/proc/{qemu}").exists() else 0
    print(f"during the fork bomb: QEMU RSS {rss:.0f} MB, worst host delay {lat * 1000:.0f} ms")
    assert lat < 3.0, f"the host stalled for {lat:.1f} s"
    assert rss < memory_mb + 600
    # whatever state the guest is in: a restart gives a fresh VM that works
    t0 = time.monotonic()
    k.km.restart_kernel(now=True)
    k.kc.wait_for_ready(timeout=400)
    assert k.km.provisioner.kernel_vm.vm.qemu.pid != qemu
    assert not Path(f"/proc/{qemu}").exists() or "State:\tZ" in Path(f"/proc/{qemu}/status").read_text()
    assert run_ok(k.kc, "print(6 * 7)", timeout=120).strip() == "42"
    print(f"restart after the bombs: {time.monotonic() - t0:.0f} s")
    subprocess.run(["true"], check=True)
