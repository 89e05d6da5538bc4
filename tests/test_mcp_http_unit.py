"""`capsem mcp --http` without a VM (capsem_kernel/mcp_http.py): the real ASGI app served by
uvicorn on 127.0.0.1, driven by the SDK's own streamable-HTTP client, with stand-in sandboxes
(tests/test_mcp_unit.StandIn). The real VMs: tests/test_mcp_http.py."""

from __future__ import annotations

import asyncio
import os
import socket
import threading
import time

import pytest
from hypothesis import given
from hypothesis import strategies as st

from capsem_kernel import mcp_http
from test_mcp_unit import StandIn

TOKEN = "t0ken-" + "x" * 40


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Served:
    def __init__(self, idle_timeout=0.0):
        import uvicorn
        self.made: list[StandIn] = []
        self.sessions = mcp_http.Sessions(lambda: self.made.append(StandIn()) or self.made[-1], idle_timeout)
        self.port = free_port()
        app = mcp_http.build_app(self.sessions, TOKEN, "127.0.0.1")
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        self.url = f"http://127.0.0.1:{self.port}/mcp"

    def stop(self):
        self.server.should_exit = True
        self.thread.join(20)


@pytest.fixture
def served():
    s = Served()
    yield s
    s.stop()


def client(url, token=TOKEN):
    from mcp import Client
    from mcp.client.streamable_http import streamable_http_client
    from mcp.shared._httpx_utils import create_mcp_http_client
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    return Client(streamable_http_client(url, http_client=create_mcp_http_client(headers=headers)))


def test_requests_without_the_token_get_401(served):
    import httpx2
    body = {"jsonrpc": "2.0", "id": 1, "method": "initialize",
            "params": {"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}}}
    hdrs = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}
    for auth in (None, "Bearer wrong", f"Basic {TOKEN}", f"Bearer {TOKEN}x", f"Bearer {TOKEN[:-1]}", "Bearer x", TOKEN):
        h = dict(hdrs, **({"Authorization": auth} if auth else {}))
        for method in ("POST", "GET", "DELETE"):
            r = httpx2.request(method, served.url, headers=h, json=body if method == "POST" else None)
            assert r.status_code == 401, (auth, method, r.status_code)
            assert r.headers["www-authenticate"].startswith("Bearer")
    r = httpx2.post(served.url, headers=dict(hdrs, Authorization=f"bearer {TOKEN}"), json=body)
    assert r.status_code == 200
    assert served.made == []


def test_the_sdk_client_fails_without_or_with_a_wrong_token(served):
    async def go(token):
        async with client(served.url, token) as c:
            await c.list_tools()
    for token in (None, "wrong-token-but-long-enough"):
        with pytest.raises(BaseException):
            asyncio.run(asyncio.wait_for(go(token), 30))
    assert served.made == []


def test_two_sessions_two_sandboxes_and_the_end_closes_each(served):
    async def go():
        async with client(served.url) as a, client(served.url) as b:
            tools = {t.name for t in (await a.list_tools()).tools}
            assert {"run_code", "read_file", "write_file", "list_files", "network_log"} <= tools
            assert served.made == []  # listing boots nothing
            await a.call_tool("run_code", {"code": "1"})
            await b.call_tool("run_code", {"code": "2"})
            await a.call_tool("run_code", {"code": "3"})
            assert len(served.made) == 2 and len(served.sessions.ids()) == 2
            assert [c[1] for c in served.made[0].calls] == ["1", "3"]
            assert [c[1] for c in served.made[1].calls] == ["2"]
        # both clients sent DELETE on exit: their sandboxes are closed
    asyncio.run(asyncio.wait_for(go(), 60))
    deadline = time.monotonic() + 10
    while not all(m.closed for m in served.made):
        assert time.monotonic() < deadline, "a session's sandbox was not closed at its end"
        time.sleep(0.05)
    assert served.sessions.ids() == []


def test_an_idle_session_sandbox_is_closed():
    s = Served(idle_timeout=0.5)
    try:
        async def go():
            async with client(s.url) as a:
                await a.call_tool("run_code", {"code": "1"})
                await asyncio.sleep(1.0)
                s.sessions.close_idle()
                assert s.made[0].closed and s.sessions.ids() == []
        asyncio.run(asyncio.wait_for(go(), 60))
    finally:
        s.stop()


def test_close_all_closes_every_sandbox(served):
    async def go():
        async with client(served.url) as a:
            await a.call_tool("run_code", {"code": "1"})
            served.sessions.close_all()
            assert served.made[0].closed
    asyncio.run(asyncio.wait_for(go(), 60))


# --- the token ------------------------------------------------------------------------------------

@given(header=st.binary(max_size=80))
def test_authorized_only_with_the_exact_token(header):
    token = TOKEN.encode()
    ok = mcp_http.authorized(header, token)
    assert ok == (header[:7].lower() == b"bearer " and header[7:].strip() == token)


def test_token_file_checks(tmp_path):
    good = tmp_path / "tok"
    good.write_text(TOKEN + "\n")
    os.chmod(good, 0o600)
    assert mcp_http.read_token_file(str(good)) == TOKEN
    os.chmod(good, 0o640)
    with pytest.raises(mcp_http.TokenError, match="chmod 600"):
        mcp_http.read_token_file(str(good))
    os.chmod(good, 0o600)
    link = tmp_path / "link"
    os.symlink(good, link)
    with pytest.raises(mcp_http.TokenError):
        mcp_http.read_token_file(str(link))
    short = tmp_path / "short"
    short.write_text("abc")
    os.chmod(short, 0o600)
    with pytest.raises(mcp_http.TokenError):
        mcp_http.read_token_file(str(short))
    with pytest.raises(mcp_http.TokenError):
        mcp_http.read_token_file(str(tmp_path))
    with pytest.raises(mcp_http.TokenError):
        mcp_http.read_token_file(str(tmp_path / "missing"))
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo, 0o600)
    with pytest.raises(mcp_http.TokenError):
        mcp_http.read_token_file(str(fifo))  # never blocks
