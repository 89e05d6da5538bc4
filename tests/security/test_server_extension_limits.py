"""The server extension against a hostile kernel or token holder, with a real Jupyter server and a
real capsem kernel (one VM for the module):

- a kernel whose browser is gone floods output: the server keeps at most
  c.CapsemExtension.offline_buffer_bytes of it (jupyter_server alone keeps everything), and the
  reconnecting client gets the kept part and a note saying what was dropped (issue 15 item 8);
- policy edits from the browser (allowed by the admin) can never add, remove or change credentials
  (issue 15 item 3).
"""

from __future__ import annotations

import json
import os
import time
import uuid
from datetime import datetime, timezone

import pytest
import websocket

from jupyter_helpers import ServerWorld

pytestmark = pytest.mark.vm

CAP = 8 << 20             # the test server's offline buffer cap
FLOOD_CHUNK = 1 << 20    # one flushed stream message (few large ones: the guest PUB socket drops by count)
FLOOD_COUNT = 128         # 128 MiB of output while no browser is connected
CREDENTIAL = """
[[credential]]
name = "svc"
hosts = ["api.test.example"]
env = "CAPSEM_TEST_NOT_SET"
header = "Authorization"
format = "Bearer {value}"
"""
POLICY = """
[[rule]]
name = "pypi-read"
host = "pypi.org"
scheme = "https"
methods = ["GET"]
action = "allow"
""" + CREDENTIAL
# the replay is measured whole: jupyter_server's own iopub rate limit off
SERVER_WORLD = ServerWorld("capsem-limits", POLICY, (
    "--CapsemExtension.allow_policy_edits=True", f"--CapsemExtension.offline_buffer_bytes={CAP}",
    "--ZMQChannelsWebsocketConnection.limit_rate=False"), start_timeout=900)


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def ws_connect(server, kernel_id: str, session_id: str) -> websocket.WebSocket:
    return websocket.create_connection(
        f"{server.url.replace('http', 'ws', 1)}api/kernels/{kernel_id}/channels?session_id={session_id}",
        header=[f"Authorization: token {server.token}"], timeout=600)


def ws_execute(ws, code: str) -> str:
    msg_id = uuid.uuid4().hex
    ws.send(json.dumps({
        "header": {"msg_id": msg_id, "username": "test", "session": "limits", "msg_type": "execute_request",
                   "version": "5.3", "date": datetime.now(timezone.utc).isoformat()},
        "parent_header": {}, "metadata": {}, "channel": "shell", "buffers": [],
        "content": {"code": code, "silent": False, "store_history": False, "user_expressions": {},
                    "allow_stdin": False, "stop_on_error": True}}))
    return msg_id


def until(ws, msg_id: str, done, timeout: float = 600) -> list[dict]:
    out, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        ws.settimeout(max(1.0, deadline - time.monotonic()))
        msg = json.loads(ws.recv())
        if msg.get("parent_header", {}).get("msg_id") == msg_id:
            out.append(msg)
            if done(out):
                return out
    raise AssertionError(f"timed out; {len(out)} messages so far")


def test_output_of_a_kernel_with_no_browser_is_capped_and_the_drop_is_reported(server_world):
    server, kid = server_world["server"], server_world["kernel"]
    session = uuid.uuid4().hex
    ws = ws_connect(server, kid, session)
    warm = ws_execute(ws, "print('ready')")
    until(ws, warm, lambda ms: any(m["msg_type"] == "status" and m["content"]["execution_state"] == "idle" for m in ms))
    base = rss_kib(server.proc.pid)
    # the cell waits, then prints 128 MiB in 1 MiB messages; the browser goes away before that
    flood = ws_execute(ws, f"import sys, time\ntime.sleep(4)\nline = 'x' * {FLOOD_CHUNK - 1} + '\\n'\n"
                           f"for i in range({FLOOD_COUNT}):\n    sys.stdout.write(line); sys.stdout.flush()\n"
                           "print('flood done')\n")
    until(ws, flood, lambda ms: any(m["msg_type"] == "execute_input" for m in ms))
    ws.close()
    # the server keeps buffering for the disconnected session; watch its memory until the cell ends
    peak, busy_seen, deadline = base, False, time.monotonic() + 900
    while time.monotonic() < deadline:
        peak = max(peak, rss_kib(server.proc.pid))
        state = server.get(f"/api/kernels/{kid}")[1].get("execution_state")
        busy_seen = busy_seen or state == "busy"
        if busy_seen and state == "idle":
            break
        time.sleep(0.2)
    else:
        raise AssertionError("the flood did not end")
    peak = max(peak, rss_kib(server.proc.pid))
    grew_mib = (peak - base) / 1024
    print(f"\nserver RSS {base / 1024:.0f} MiB -> peak {peak / 1024:.0f} MiB (+{grew_mib:.0f} MiB) for "
          f"{FLOOD_CHUNK * FLOOD_COUNT >> 20} MiB of output, cap {CAP >> 20} MiB")
    # reconnect with the same session: the kept part, the note, and the end of the cell
    ws = ws_connect(server, kid, session)
    try:
        msgs = until(ws, flood, lambda ms: any(m["msg_type"] == "execute_reply" for m in ms)
                     and any(m["msg_type"] == "status" and m["content"]["execution_state"] == "idle" for m in ms))
    finally:
        ws.close()
    streams = [m for m in msgs if m["msg_type"] == "stream"]
    kept = sum(len(m["content"]["text"]) for m in streams if m["content"]["name"] == "stdout")
    notes = [m["content"]["text"] for m in streams if m["content"]["name"] == "stderr" and "capsem:" in m["content"]["text"]]
    print(f"replayed {kept >> 20} MiB of stdout in {len(streams)} stream messages; note: {notes}")
    assert CAP // 2 < kept <= CAP, kept
    assert streams[0]["content"]["text"] == notes[0]  # the note comes first
    assert len(notes) == 1 and "were dropped while no browser was connected" in notes[0], notes
    dropped = int(notes[0].split("capsem: ")[1].split(" message")[0])
    assert dropped * FLOOD_CHUNK + kept >= FLOOD_CHUNK * FLOOD_COUNT * 0.9, (dropped, kept)
    assert grew_mib < 64, f"the server grew by {grew_mib:.0f} MiB while buffering"
    assert "dropping further output until a client reconnects" in server.log()


def put_policy(server_world, text: str):
    return server_world["server"].request("PUT", f"/capsem/kernels/{server_world['kernel']}/policy", {"text": text})


def test_policy_edits_cannot_add_remove_or_change_credentials(server_world):
    policy = server_world["policy"]
    before = policy.read_text()
    other = POLICY.replace("pypi.org", "files.pythonhosted.org")
    attempts = {
        "added": before + '\n[[credential]]\nname = "mine"\nhosts = ["evil.example"]\nenv = "HOME"\nheader = "X-Leak"\n',
        "removed": POLICY.replace(CREDENTIAL, ""),
        "hosts changed": other.replace('hosts = ["api.test.example"]', 'hosts = ["evil.example"]'),
        "header changed": before.replace('header = "Authorization"', 'header = "X-Echoed-Back"'),
        "env changed": before.replace("CAPSEM_TEST_NOT_SET", "JUPYTER_TOKEN"),
        "a query added": before.replace('format = "Bearer {value}"', 'format = "Bearer {value}"\nquery = "q"'),
        "file instead of env": before.replace('env = "CAPSEM_TEST_NOT_SET"', f'file = "{os.path.expanduser("~/.ssh/id_ed25519")}"'),
    }
    for name, text in attempts.items():
        status, body = put_policy(server_world, text)
        assert status == 403, (name, status, body)
        assert "cannot add, remove or change credentials" in body["message"] and "svc" in body["message"], body
        assert policy.read_text() == before, name
    # rules may change (the admin allowed edits); the credentials, identical as TOML data, stay
    same_creds_other_spelling = other.replace(CREDENTIAL, '\n[[credential]]\nname="svc"\nformat="Bearer {value}"\n'
                                              'header="Authorization"\nenv="CAPSEM_TEST_NOT_SET"\n'
                                              'hosts=["api.test.example"]\n')
    status, body = put_policy(server_world, same_creds_other_spelling)
    assert status == 200, body
    assert policy.read_text() == same_creds_other_spelling
    # the running kernel reloads it at once (issue 22), its credentials unchanged
    assert body["reloaded"] == {server_world["kernel"]: "reloaded"}, body
    assert [c["name"] for c in body["credentials"]] == ["svc"]
    assert {r["host"] for r in body["rules"] if not r["builtin"]} == {"files.pythonhosted.org"}  # what it enforces now
