"""Issue 15 items 6 and 7 from inside a real guest (root, hostile):

- guest-chosen names with ESC sequences, CR/LF, NUL, U+2028 and U+202E, sent straight to the
  host's egress (5002) and DNS (5003) vsock ports, are stored escaped in the audit database, and
  `capsem audit` prints them escaped;
- a frame whose JSON the host's decoder could not take before (a 5000-digit integer: CPython's
  int-digits limit raised ValueError out of json.loads and killed the control reader, leaving every
  pending host request hanging) is refused as a protocol error: the host fails closed at once
  (pending requests fail, the VM is dropped) and stays responsive. Destructive: last.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import tempfile
import time
from pathlib import Path

import pytest

import guest_scripts as gs
from kernel_helpers import running_vm, vm_exec

from capsem_kernel import loop_thread
from capsem_vm.egress_runtime import EgressRuntime, set_process_runtime
from capsem_vm.config import EgressConfig, VMConfig
from capsem_vm.errors import VMError
from capsem_vm.proxy import read_events
from capsem_vm.proxy.cli import main as proxy_main

pytestmark = pytest.mark.vm
KERNEL_ID = "k-hostile-" + os.urandom(4).hex()  # unique: the audit database may be shared
# independent of capsem_vm.safetext: C0, DEL, C1, U+2028/9, bidi controls, lone surrogates
UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069\ud800-\udfff]")

NAMES = ["esc\x1b[2J\x1b]0;owned\x07.example", "crlf\r\n2026-01-01 forged.example", "nul\x00.example",
         "ls\u2028x.example", "bidi\u202elpmaxe.com", "c1\x9b31m.example"]

# the guest talks to the host's egress and DNS ports itself (no agent, no stub resolver)
PROBE = r"""
import base64, json, socket, struct, sys
names = json.loads(sys.argv[1])
def frame(msg):
    body = json.dumps(msg).encode()
    return struct.pack(">I", len(body)) + body
def recv_frame(s):
    head = b""
    while len(head) < 4:
        chunk = s.recv(4 - len(head))
        if not chunk:
            return None
        head += chunk
    (n,) = struct.unpack(">I", head)
    body = b""
    while len(body) < n:
        chunk = s.recv(n - len(body))
        if not chunk:
            return None
        body += chunk
    return json.loads(body)
out = {"connect": [], "dns": []}
for name in names:
    s = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
    s.settimeout(30)
    s.connect((2, 5002))
    s.sendall(frame({"t": "connect", "host": name, "port": 443}))
    out["connect"].append(recv_frame(s))
    s.close()
s = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
s.settimeout(30)
s.connect((2, 5003))
for name in names:
    labels = [l.encode("utf-8", "surrogatepass") for l in name.split(".") if l]
    q = struct.pack(">HHHHHH", 0x4242, 0x0100, 1, 0, 0, 0) + b"".join(bytes([len(l)]) + l for l in labels) \
        + b"\x00" + struct.pack(">HH", 1, 1)
    s.sendall(frame({"t": "dns", "data": base64.b64encode(q).decode()}))
    out["dns"].append(recv_frame(s))
print(json.dumps(out))
"""

class Env:
    pass


@pytest.fixture(scope="module")
def env(image_dir):
    e = Env()
    base = Path(tempfile.mkdtemp(prefix="capsem-hostile-"))
    env = {"CAPSEM_RUNTIME_DIR": str(base / "run"),
           "CAPSEM_DATA_DIR": str(base / "data"),  # a private audit database
           "CAPSEM_CONFIG_DIR": str(base / "config")}  # no user policy: deny-all, no proxy
    e.runtime = EgressRuntime()  # the module's own, used by the VM (made without one) and the barrier
    before = set_process_runtime(e.runtime)
    (base / "run").mkdir(mode=0o700)
    e.events = []
    try:
        with running_vm(VMConfig(memory_mb=512, cpus=1, egress=EgressConfig(kernel_id=KERNEL_ID)), env) as e.vm:
            e.vm.on_event = e.events.append
            yield e
    finally:
        set_process_runtime(before)
        loop_thread.run_sync(e.runtime.close(), 30)
        shutil.rmtree(base, ignore_errors=True)


def test_guest_chosen_names_are_stored_and_printed_escaped(env, capsys):
    code, out, err = vm_exec(env.vm, ["python3", "-c", PROBE, json.dumps(NAMES)], 120)
    assert code == 0, err
    res = json.loads(out.strip().splitlines()[-1])
    assert all(r and r["t"] == "refused" for r in res["connect"]), res
    audit = env.runtime.audit  # the VM owner's writer: the bridge's rows (no proxy: deny-all)
    audit.flush()
    rows = read_events(audit.db_path, kernel=KERNEL_ID)
    assert len(rows) >= len(NAMES)
    texts = [v for r in rows for v in r.values() if isinstance(v, str)]
    assert not [t for t in texts if UNSAFE.search(t)]
    joined = "\n".join(texts)
    assert "esc\\x1b[2J\\x1b]0;owned\\x07" in joined and "\\u202e" in joined and "\\u2028" in joined
    assert "crlf\\x0d\\x0a2026-01-01 forged" in joined
    capsys.readouterr()
    assert proxy_main(["audit", "--db", str(audit.db_path), "--kernel", KERNEL_ID, "--limit", "500"]) == 0
    printed = capsys.readouterr().out
    assert "\\x1b" in printed and not any(UNSAFE.search(line) for line in printed.splitlines())
    # the barrier a reader uses (docs/AUDIT.md) holds here too
    assert loop_thread.run_sync(env.runtime.audit_barrier(), 30)


def test_a_huge_integer_on_the_control_connection_fails_closed_at_once(env):
    """The forger runs as a host exec on the very connection it breaks: that exec is a pending host
    request. On main the reader died of ValueError and the exec's wait hung forever."""
    control = env.vm.control
    # gs.FORGE steals the agent's own control socket (pidfd_getfd) and sends a 5000-digit integer
    proc = loop_thread.run_sync(control.exec(["python3", "-c", gs.FORGE, "huge-int", "/dev/null"]), 60)
    t0 = time.monotonic()
    with pytest.raises(VMError):
        loop_thread.run_sync(proc.wait(), 90)  # failed by the reader, never left hanging
    assert time.monotonic() - t0 < 80
    loop_thread.run_sync(asyncio.wait_for(control.closed.wait(), 30), 40)
    task = control._reader_task
    assert task is None or (task.done() and not task.cancelled() and task.exception() is None)
    assert any(m.get("t") == "closed" for m in env.events)
    t1 = time.monotonic()
    loop_thread.run_sync(asyncio.sleep(0.01), 5)  # the host's loop is responsive
    assert time.monotonic() - t1 < 2
    deadline = time.monotonic() + 60
    while env.vm.alive() and time.monotonic() < deadline:  # the host drops the VM it cannot trust
        time.sleep(0.5)
    assert not env.vm.alive()
