"""The pure parts of `capsem mcp` (no VM): Execution / CommandResult -> MCP content, the session's
lazy, idle-closing sandbox holder, and the tool wiring seen through the SDK's own in-process
client with a stand-in sandbox. tests/test_mcp.py drives the real server over stdio with a VM."""

from __future__ import annotations

import base64
import json
from types import SimpleNamespace
import threading

import pytest
from hypothesis import given
from hypothesis import strategies as st

from capsem_kernel.commands import CommandResult
from capsem_kernel.execution import Execution, ExecutionError, Logs, Result
from capsem_kernel.mcp_server import (SandboxHolder, build_server, content_for_execution, network_lines,
                                      strip_ansi, text_for_command)

PNG_B64 = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="
DENY = {"id": 7, "kind": "http", "decision": "deny", "method": "GET", "url": "http://blocked.example/x",
        "host": "blocked.example", "status": 403, "rule": None, "code": "default-deny", "reason": "no rule allows it"}
ALLOW = {"id": 6, "kind": "http", "decision": "allow", "method": "GET", "url": "https://ok.example/",
         "host": "ok.example", "status": 200, "rule": "api", "code": "rule-allow", "reason": "allowed"}


def execution(**kw) -> Execution:
    return Execution(**kw)


def test_execution_text_parts_and_image():
    ex = execution(logs=Logs(stdout=["a\n", "b\n"], stderr=["w\n"]),
                   results=[Result.from_bundle({"image/png": PNG_B64 + "\n", "text/plain": "<Figure>"}, False),
                            Result.from_bundle({"text/plain": "42"}, True)],
                   error=ExecutionError("ValueError", "nope", "\x1b[0;31mValueError\x1b[0m: nope"),
                   network=[ALLOW, DENY])
    text, image = content_for_execution(ex)
    assert image == {"type": "image", "data": PNG_B64, "mimeType": "image/png"}
    t = text["text"]
    assert "[stdout]\na\nb" in t and "[stderr]\nw" in t and "[result]\n42" in t and "[image image/png]" in t
    assert "[error] ValueError: nope\nValueError: nope" in t and "\x1b" not in t
    assert "[network] 2 audit rows, 1 refused" in t
    assert "deny http GET http://blocked.example/x -> 403 [default-deny]: no rule allows it" in t
    assert "allow http GET https://ok.example/ -> 200" in t


def test_no_output_and_a_bad_image_is_not_passed_on():
    assert content_for_execution(execution()) == [{"type": "text", "text": "(no output)"}]
    ex = execution(results=[Result.from_bundle({"image/png": "not base64!", "text/plain": "<img>"}, False)])
    assert content_for_execution(ex) == [{"type": "text", "text": "[display]\n<img>"}]


def test_command_text():
    assert text_for_command(CommandResult(3, "out\n", "err\n")) == "exit code: 3\n[stdout]\nout\n[stderr]\nerr"
    assert text_for_command(CommandResult(124, "", "", error="timed out")) == "exit code: 124\n[error] timed out"


@given(st.lists(st.dictionaries(st.sampled_from(["kind", "decision", "method", "url", "host", "status", "rule",
                                                 "code", "reason"]),
                                st.one_of(st.none(), st.text(max_size=20), st.integers()))))
def test_network_lines_are_total(rows):
    assert len(network_lines(rows)) == len(rows)


@given(st.text())
def test_strip_ansi_leaves_no_escape_sequence(text):
    assert "\x1b[0m" not in strip_ansi(text + "\x1b[0m")


class StandIn:
    """What the tools call on a Sandbox, answering fixed values (the real one: tests/test_mcp.py)."""

    def __init__(self):
        self.closed = False
        self.calls = []

    def is_alive(self):
        return not self.closed

    def close(self):
        self.closed = True

    def run_code(self, code, timeout=None):
        self.calls.append(("run_code", code, timeout))
        return execution(results=[Result.from_bundle({"image/png": PNG_B64}, False),
                                  Result.from_bundle({"text/plain": "2"}, True)])

    def network_log(self, after_id=0, limit=100):
        self.calls.append(("network_log", after_id, limit))
        return [DENY]

    def restart(self):
        self.calls.append(("restart",))

    @property
    def commands(self):
        outer = self

        class C:
            def run(self, cmd, cwd=None, timeout=None):
                outer.calls.append(("run", cmd, cwd, timeout))
                return CommandResult(1, "", "no\n")
        return C()

    @property
    def files(self):
        outer = self

        class F:
            def read(self, path, format="text", max_bytes=0):
                outer.calls.append(("read", path, format, max_bytes))
                return b"\xff\x00" if path == "bin" else "text\n".encode()

            def write(self, path, data):
                outer.calls.append(("write", path, data))
                return SimpleNamespace(path=f"/nb/{path}")

            def list(self, path=""):
                outer.calls.append(("list", path))
                return [SimpleNamespace(type="dir", size=0, name="d"), SimpleNamespace(type="file", size=5, name="f")]
        return F()


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_holder_starts_lazily_once_and_closes_when_idle():
    made = []
    clock = Clock()
    holder = SandboxHolder(lambda: made.append(StandIn()) or made[-1], idle_timeout=10, clock=clock)
    assert holder.current() is None and not holder.close_if_idle()
    sb, note = holder.acquire()
    clock.now = 100  # a long call: never closed while in use
    assert not holder.close_if_idle()
    holder.release()
    assert holder.acquire() == (sb, "")
    holder.release()
    assert len(made) == 1
    clock.now = 105
    assert not holder.close_if_idle()
    clock.now = 111
    assert holder.close_if_idle() and sb.closed and holder.current() is None
    sb2, note = holder.acquire()
    holder.release()
    assert sb2 is not sb and "idle" in note
    holder.close()
    assert sb2.closed
    with pytest.raises(RuntimeError, match="closing"):
        holder.acquire()


def test_holder_replaces_a_dead_sandbox_and_closes_it():
    holder = SandboxHolder(StandIn, idle_timeout=0)
    sb, _ = holder.acquire()
    holder.release()
    sb.closed = True  # its kernel died
    sb2, note = holder.acquire()
    holder.release()
    assert sb2 is not sb and "died" in note
    assert not holder.close_if_idle()  # idle_timeout 0: never


def test_holder_closed_while_starting_does_not_leak_the_new_sandbox():
    started, go = threading.Event(), threading.Event()
    made = []

    def slow():
        started.set()
        go.wait(5)
        made.append(StandIn())
        return made[-1]
    holder = SandboxHolder(slow)
    errors = []
    t = threading.Thread(target=lambda: errors.append(pytest.raises(RuntimeError, holder.acquire)))
    t.start()
    started.wait(5)
    holder.close()
    go.set()
    t.join(5)
    assert made[0].closed and holder.current() is None and errors


async def test_tools_through_the_sdk_client_in_process():
    from mcp import Client
    made = []
    holder = SandboxHolder(lambda: made.append(StandIn()) or made[-1], idle_timeout=0)
    async with Client(build_server(holder)) as client:
        tools = {t.name: t for t in (await client.list_tools()).tools}
        assert set(tools) == {"run_code", "run_command", "restart", "network_log", "read_file", "write_file",
                              "list_files"}  # issue 17: the file tools were added on purpose
        assert set(tools["run_code"].input_schema["properties"]) == {"code", "timeout"}
        assert made == []  # listing tools boots nothing
        r = await client.call_tool("run_code", {"code": "1 + 1", "timeout": 5})
        assert not r.is_error
        assert [c.type for c in r.content] == ["text", "image"]
        assert "[result]\n2" in r.content[0].text and base64.b64decode(r.content[1].data)[:4] == b"\x89PNG"
        r = await client.call_tool("run_command", {"command": "false"})
        assert r.content[0].text.startswith("exit code: 1")
        r = await client.call_tool("network_log", {"limit": 10**9})
        assert json.loads(r.content[0].text) == [DENY]
        r = await client.call_tool("restart", {})
        assert "restarted" in r.content[0].text
        assert (await client.call_tool("read_file", {"path": "t"})).content[0].text == "text\n"
        assert (await client.call_tool("read_file", {"path": "bin"})).content[0].text.endswith("\n/wA=")
        r = await client.call_tool("write_file", {"path": "w", "content": "AAE=", "base64_encoded": True})
        assert r.content[0].text == "wrote 2 bytes to /nb/w"
        r = await client.call_tool("list_files", {})
        assert r.content[0].text.splitlines()[0].split() == ["dir", "0", "d/"]
        made[0].calls[4:] = []
    assert len(made) == 1
    assert made[0].calls == [("run_code", "1 + 1", 5), ("run", "false", None, None), ("network_log", 0, 5000),
                             ("restart",)]
