"""Unit tests of the guest's kernel bootstrap modules (kernel_boot, held_requests, warm_kernel) and
of ipykernel_host's pure parts. The kernels they start are tested through the real agent in
test_agent_kernel.py."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from hypothesis import given, strategies as st

from capsem_agent import ipykernel_host, kernel_boot, protocol
from capsem_agent.held_requests import NOT_HELD, HeldRequests


# --- kernel_boot ----------------------------------------------------------------------------------

def test_agent_root_is_the_directory_that_holds_the_package():
    assert (Path(kernel_boot.AGENT_ROOT) / "capsem_agent" / "__init__.py").is_file()
    assert ipykernel_host.bootstrap_env({"A": "1"}) == {"A": "1", "PYTHONPATH": kernel_boot.AGENT_ROOT}


def test_forget_launch_path_drops_the_launch_dir_and_the_agent_root(monkeypatch):
    monkeypatch.setattr(sys, "path", ["/launch/dir", "/agent", "/lib/python", "/agent"])
    monkeypatch.setenv("PYTHONPATH", "/agent")
    kernel_boot.forget_launch_path("/agent")
    assert sys.path == ["/lib/python"]
    assert "PYTHONPATH" not in os.environ


def test_forget_launch_path_keeps_a_pythonpath_that_is_not_the_agents(monkeypatch):
    monkeypatch.setattr(sys, "path", ["", "/lib/python"])
    monkeypatch.setenv("PYTHONPATH", "/the/users")
    kernel_boot.forget_launch_path("/agent")
    assert sys.path == ["/lib/python"] and os.environ["PYTHONPATH"] == "/the/users"


def test_forget_agent_modules(monkeypatch):
    fake = type(sys)("fake")
    monkeypatch.setitem(sys.modules, "capsem_agent.fake_for_test", fake)
    monkeypatch.setitem(sys.modules, "capsem_agentish", fake)
    saved = {n: m for n, m in sys.modules.items() if n == "capsem_agent" or n.startswith("capsem_agent.")}
    try:
        kernel_boot.forget_agent_modules()
        assert not [n for n in sys.modules if n == "capsem_agent" or n.startswith("capsem_agent.")]
        assert sys.modules["capsem_agentish"] is fake
    finally:
        sys.modules.update({n: m for n, m in saved.items() if n != "capsem_agent.fake_for_test"})


@given(st.text(alphabet="abcdefghijklmnopqrstuvwxyz_.", min_size=1, max_size=30))
def test_hide_debugpy_refuses_exactly_debugpy_and_its_submodules(name):
    hide = kernel_boot.HideDebugpy()
    for candidate in (name, "debugpy", "debugpy." + name):
        if candidate == "debugpy" or candidate.startswith("debugpy."):
            with pytest.raises(ImportError) as exc:
                hide.find_spec(candidate)
            assert exc.value.name == candidate
        else:
            assert hide.find_spec(candidate) is None


def _run_module(module: str, code_on_stdin: bytes = b"", timeout: float = 120) -> subprocess.CompletedProcess:
    env = ipykernel_host.bootstrap_env(ipykernel_host.IPyKernelHost._env(None, {}))
    return subprocess.run(ipykernel_host.bootstrap_argv(module), input=code_on_stdin, capture_output=True,
                          cwd="/", env=env, timeout=timeout)


def test_warm_kernel_module_runs_with_python_m_and_exits_when_its_parameters_never_come():
    """The agent's argv and env find the module; it imports ipykernel, writes the marker, and a
    closed stdin (the agent discarded it) ends it cleanly."""
    done = _run_module(ipykernel_host.WARM_MODULE)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.endswith(kernel_boot.WARM_MARKER), done.stdout


def test_ipykernel_imported_without_debugpy_which_stays_importable():
    code = ("import sys; from capsem_agent import kernel_boot; kernel_boot.forget_launch_path(); "
            "kernel_boot.import_ipykernel_without_debugpy(); import ipykernel.debugger as d; "
            "print('debugpy' in sys.modules, d._is_debugpy_available, sys.meta_path[0].__class__.__name__); "
            "import debugpy; print(debugpy.__name__)")
    env = ipykernel_host.bootstrap_env(ipykernel_host.IPyKernelHost._env(None, {}))
    done = subprocess.run([ipykernel_host.kernel_python(), "-c", code], capture_output=True, text=True, env=env,
                          cwd="/", timeout=120)
    assert done.returncode == 0, done.stderr
    first, second = done.stdout.splitlines()
    assert first.split()[:2] == ["False", "False"] and first.split()[2] != "HideDebugpy"
    assert second == "debugpy"


# --- held_requests ---------------------------------------------------------------------------------

def test_held_requests_wait_in_order_until_released_and_kernel_info_passes():
    async def scenario():
        ran = []

        def sync_handler(tag):
            ran.append(tag)

        async def async_handler(tag):
            # recorded on entry: the gate wakes its waiters in order; what a handler does after
            # its first await may interleave (the real kernel serializes shell handlers itself)
            ran.append(tag)
            await asyncio.sleep(0)

        handlers = {"kernel_info_request": sync_handler, "execute_request": async_handler,
                    "complete_request": sync_handler}
        original = dict(handlers)
        held = HeldRequests()
        held.hold(handlers)
        assert handlers["kernel_info_request"] is original["kernel_info_request"]
        assert all(handlers[t] is not original[t] for t in handlers if t not in NOT_HELD)
        first = asyncio.ensure_future(handlers["execute_request"]("first"))
        second = asyncio.ensure_future(handlers["complete_request"]("second"))
        handlers["kernel_info_request"]("info")
        await asyncio.sleep(0.05)
        assert ran == ["info"] and not first.done() and not second.done()
        # released from another thread, as the kernel's loop may not be the caller's
        threading.Thread(target=held.release).start()
        await asyncio.wait_for(asyncio.gather(first, second), 5)
        assert ran == ["info", "first", "second"]
        await handlers["execute_request"]("after")  # open now: passes at once
        assert ran[-1] == "after"

    asyncio.run(scenario())


def test_held_requests_open_until_held():
    async def scenario():
        held = HeldRequests()
        await asyncio.wait_for(held.passed(), 1)
        held.release()  # nothing waiting: harmless
        await asyncio.wait_for(held.passed(), 1)

    asyncio.run(scenario())


# --- ipykernel_host --------------------------------------------------------------------------------

def _start_msg(**kw) -> dict:
    msg = {"t": "kernel_start", "id": 7, "key": "k" * 64, "signature_scheme": "hmac-sha256", "cwd": "/nb"}
    msg.update(kw)
    return msg


def test_start_request_from_message():
    req = ipykernel_host.StartRequest.from_message(_start_msg(env={"A": "1"}, uid=1000, hold=True))
    assert (req.key, req.scheme, req.cwd, req.env, req.uid, req.gid, req.hold) == \
        ("k" * 64, "hmac-sha256", "/nb", {"A": "1"}, 1000, None, True)
    req = ipykernel_host.StartRequest.from_message(_start_msg())
    assert (req.env, req.uid, req.gid, req.hold) == ({}, None, None, False)


@given(st.text(max_size=40))
def test_start_request_refuses_any_other_signature_scheme(scheme):
    msg = _start_msg(signature_scheme=scheme)
    if ipykernel_host._SCHEME.match(scheme):
        assert ipykernel_host.StartRequest.from_message(msg).scheme == scheme
    else:
        with pytest.raises(protocol.MessageError):
            ipykernel_host.StartRequest.from_message(msg)


@pytest.mark.parametrize("field,value", [("key", "k" * 4097), ("key", 5), ("cwd", None), ("uid", -1),
                                         ("gid", 2**32 - 1), ("hold", "yes"), ("env", {"A": 1})])
def test_start_request_refuses_bad_fields(field, value):
    with pytest.raises(protocol.MessageError):
        ipykernel_host.StartRequest.from_message(_start_msg(**{field: value}))


def test_preinit_kernel_discard_removes_its_dir_and_closes_its_pipe_and_spares(tmp_path):
    conn_dir = tmp_path / "kernel-1"
    conn_dir.mkdir()
    (conn_dir / "connection.json").write_text("{}")
    ack_r, ack_w = os.pipe()
    spares = ipykernel_host.SpareConnections()
    pre = ipykernel_host.PreinitKernel({"shell": 1}, str(conn_dir), str(conn_dir / "connection.json"), ack_r, spares)
    try:
        pre.discard()
        assert not conn_dir.exists() and spares.closed and spares.ready.is_set()
        with pytest.raises(OSError):
            os.fstat(ack_r)
    finally:
        os.close(ack_w)
