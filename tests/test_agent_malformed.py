"""The agent treats the host's bytes as untrusted too: bad frames get errors, never a crash."""

from __future__ import annotations

import json
import socket
import time

import pytest

from capsem_agent import protocol
from agent_harness import closed_by_agent


def raw_frame(body: bytes) -> bytes:
    return len(body).to_bytes(4, "big") + body


def assert_still_serving(agent, msg_id=900):
    assert agent.client.request({"t": "ping", "id": msg_id}) == {"t": "pong", "id": msg_id}
    assert agent.alive()


BAD_MESSAGES = [
    (b"not json at all", "bad_message"),
    (b"\xff\xfe\xfd", "bad_message"),
    (b"[1, 2, 3]", "bad_message"),
    (b'{"no_type": 1}', "bad_message"),
    (b'{"t": "launch_missiles", "id": 1}', "unknown_type"),
    (b'{"t": "ping"}', "bad_message"),  # a request without id
    (b'{"t": "ping", "id": "1"}', "bad_message"),
    (b'{"t": "exec", "id": 1, "argv": "ls"}', "bad_message"),
    (b'{"t": "exec", "id": 1, "argv": []}', "bad_message"),
    (b'{"t": "exec", "id": 1, "argv": ["true"], "env": {"A": 1}}', "bad_message"),
    (b'{"t": "exec", "id": 1, "argv": ["true"], "uid": -1}', "bad_message"),
    (b'{"t": "exec", "id": 1, "argv": ["true"], "pty": "yes"}', "bad_message"),
    (b'{"t": "exec", "id": 1, "argv": ["true"], "rows": 1e9}', "bad_message"),
    (b'{"t": "stdin", "id": 77, "data": "AAAA"}', "bad_message"),
    (b'{"t": "resize", "id": 77, "rows": 0, "cols": 80}', "bad_message"),
    (b'{"t": "signal", "id": 1, "target": [1], "signum": 9}', "bad_message"),
    (b'{"t": "signal", "id": 1, "target": 1, "signum": 999}', "bad_message"),
    (b'{"t": "mount", "id": 1, "tag": 5, "path": "/x"}', "bad_message"),
    (b'{"t": "kernel_start", "id": 1, "key": "k", "signature_scheme": "rot13", "cwd": "/"}', "bad_message"),
    (b'{"t": "kernel_start", "id": 1, "key": 5, "signature_scheme": "hmac-sha256", "cwd": "/"}', "bad_message"),
    (b'{"t": "kernel_start", "id": 1, "signature_scheme": "hmac-sha256", "cwd": "/"}', "bad_message"),
    (b"[" * 200000, "bad_message"),  # deep nesting: RecursionError inside json
]


@pytest.mark.parametrize("body,code", BAD_MESSAGES, ids=[f"case{i}" for i in range(len(BAD_MESSAGES))])
def test_malformed_message_answered_with_error(agent, body, code):
    agent.client.send_raw(raw_frame(body))
    r = agent.client.recv(timeout=10)
    assert r["t"] == "error" and r["code"] == code, r
    if b'"id": 1' in body and code != "bad_message" or b'"argv": "ls"' in body:
        assert r.get("id") == 1
    assert_still_serving(agent)


def test_oversized_length_closes_connection_cleanly(agent):
    agent.client.send({"t": "ping", "id": 1})
    agent.client.send_raw((protocol.MAX_FRAME + 1).to_bytes(4, "big"))
    assert agent.client.recv(timeout=10) == {"t": "pong", "id": 1}
    r = agent.client.recv(timeout=10)
    assert r["t"] == "error" and r["code"] == "bad_frame"
    with pytest.raises(EOFError):
        agent.client.recv(timeout=10)
    assert agent.proc.wait(10) == 0  # a clean exit (in the VM: power off), not a crash


def test_request_before_bad_header_in_same_packet_is_served(agent):
    agent.client.send_raw(protocol.encode({"t": "ping", "id": 4}) + b"\xff\xff\xff\xff")
    assert agent.client.recv(timeout=10) == {"t": "pong", "id": 4}
    assert agent.client.recv(timeout=10)["code"] == "bad_frame"


def test_zero_length_frame_closes_connection(agent):
    agent.client.send_raw(b"\0\0\0\0")
    assert agent.client.recv(timeout=10)["code"] == "bad_frame"
    assert agent.proc.wait(10) == 0


def test_slow_writer_one_byte_at_a_time(agent):
    data = protocol.encode({"t": "ping", "id": 11}) + raw_frame(b"garbage") + protocol.encode({"t": "ping", "id": 12})
    for i in range(len(data)):
        agent.client.send_raw(data[i:i + 1])
        time.sleep(0.002)
    assert agent.client.recv(timeout=10) == {"t": "pong", "id": 11}
    assert agent.client.recv(timeout=10)["code"] == "bad_message"
    assert agent.client.recv(timeout=10) == {"t": "pong", "id": 12}


def test_max_size_frame_is_fine(agent):
    body = json.dumps({"t": "ping", "id": 3, "pad": "x" * (protocol.MAX_FRAME - 40)}).encode()
    assert len(body) <= protocol.MAX_FRAME
    agent.client.send_raw(raw_frame(body))
    assert agent.client.recv(timeout=10) == {"t": "pong", "id": 3}


def test_burst_of_garbage_frames(agent):
    import random
    rnd = random.Random(1)
    n = 300
    for _ in range(n):
        agent.client.send_raw(raw_frame(bytes(rnd.randrange(256) for _ in range(rnd.randrange(1, 200)))))
    for _ in range(n):
        assert agent.client.recv(timeout=10)["t"] == "error"
    assert_still_serving(agent)


def test_duplicate_exec_id_rejected(agent):
    c = agent.client
    c.send({"t": "exec", "id": 1, "argv": ["sleep", "5"]})
    assert c.recv(lambda m: m.get("id") == 1)["t"] == "started"
    r = c.request({"t": "exec", "id": 1, "argv": ["true"]})
    assert r["t"] == "error" and r["code"] == "duplicate_id"
    c.request({"t": "signal", "id": 2, "target": 1, "signum": 9})
    assert c.collect(1)[0]["signal"] == 9


# --- channel listener --------------------------------------------------------------------------

@pytest.mark.parametrize("prime", [False, True])
def test_channel_without_kernel_is_closed(agent, prime):
    """No kernel: a plain stream is closed, and so is a primed one (no warm pre-started kernel
    here; test_agent_kernel.py checks priming itself)."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(agent.channels_path)
    s.sendall(protocol.encode({"t": "channel", "name": "shell", "prime": prime})
              + (protocol.ZMTP_GREETING if prime else b""))
    assert closed_by_agent(s, timeout=15)
    assert_still_serving(agent)


@pytest.mark.parametrize("first", [
    b"\xff\xff\xff\xff", b"\0\0\0\0",
    raw_frame(b'{"t": "channel", "name": "evil"}'),
    raw_frame(b'{"t": "channel", "name": "shell", "prime": 1}'),
    raw_frame(b'{"t": "hello"}'),
    raw_frame(b"junk"),
])
def test_channel_bad_first_frame_is_closed(agent, first):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(agent.channels_path)
    s.sendall(first)
    assert closed_by_agent(s, timeout=15)
    assert_still_serving(agent)


def test_channel_flood_is_bounded(agent):
    socks = []
    for _ in range(100):  # more than the agent's concurrent stream limit; all idle
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(agent.channels_path)
        socks.append(s)
    assert_still_serving(agent)
    for s in socks:
        s.close()
