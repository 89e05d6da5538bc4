"""The pure parts of the Sandbox API (no VM): iopub messages -> Execution (E2B's shapes), the
in-memory kernelspec the Sandbox starts its kernel with. tests/test_sandbox.py runs it for real."""

from __future__ import annotations

import json

from hypothesis import given
from hypothesis import strategies as st

from capsem_kernel.execution import Execution, ExecutionBuilder, Result


def msg(msg_type: str, **content) -> dict:
    return {"msg_type": msg_type, "header": {"msg_type": msg_type}, "parent_header": {"msg_id": "m"},
            "content": content}


PNG_B64 = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="


def test_streams_results_and_error_in_e2b_shapes():
    seen = {"stdout": [], "stderr": [], "result": [], "error": []}
    b = ExecutionBuilder(on_stdout=seen["stdout"].append, on_stderr=seen["stderr"].append,
                         on_result=seen["result"].append, on_error=seen["error"].append)
    for m in (msg("status", execution_state="busy"), msg("execute_input", code="x", execution_count=7),
              msg("stream", name="stdout", text="a\n"), msg("stream", name="stderr", text="warn\n"),
              msg("stream", name="stdout", text="b\n"),
              msg("display_data", data={"image/png": PNG_B64, "text/plain": "<Figure>"}, metadata={}),
              msg("display_data", data={"text/html": "<b>x</b>", "text/markdown": "**x**", "image/svg+xml": "<svg/>",
                                        "text/latex": "$x$", "application/json": {"k": [1]},
                                        "application/vnd.custom+json": {"z": 1}}, metadata={}),
              msg("execute_result", data={"text/plain": "42"}, metadata={}, execution_count=7),
              msg("error", ename="ValueError", evalue="bad", traceback=["line 1", "line 2"])):
        assert not b.idle
        b.feed(m)
    b.feed(msg("status", execution_state="idle"))
    assert b.idle
    ex = b.execution
    assert ex.logs.stdout == ["a\n", "b\n"] and ex.logs.stderr == ["warn\n"]
    assert [m.line for m in seen["stdout"]] == ["a\n", "b\n"] and seen["stderr"][0].error is True
    assert ex.text == "42" and ex.execution_count == 7
    png, rich, main = ex.results
    assert png.png == PNG_B64 and png.text == "<Figure>" and not png.is_main_result
    assert rich.html == "<b>x</b>" and rich.markdown == "**x**" and rich.svg == "<svg/>" and rich.latex == "$x$"
    assert rich.json == {"k": [1]} and rich.extra == {"application/vnd.custom+json": {"z": 1}}
    assert rich.formats() == ["html", "markdown", "svg", "latex", "json", "application/vnd.custom+json"]
    assert main.is_main_result and main.text == "42" and str(main) == "42"
    assert seen["result"] == ex.results
    assert (ex.error.name, ex.error.value, ex.error.traceback) == ("ValueError", "bad", "line 1\nline 2")
    assert seen["error"] == [ex.error]
    assert json.loads(ex.to_json())["error"]["name"] == "ValueError"


def test_no_main_result_means_no_text():
    b = ExecutionBuilder()
    b.feed(msg("display_data", data={"text/plain": "shown"}, metadata={}))
    assert b.execution.text is None and b.execution.results[0].text == "shown"


def test_timeout_keeps_output_and_says_so():
    b = ExecutionBuilder()
    b.feed(msg("stream", name="stdout", text="so far\n"))
    b.feed(msg("error", ename="KeyboardInterrupt", evalue="", traceback=[]))
    b.timed_out(5, restarted=False)
    assert b.execution.logs.stdout == ["so far\n"]
    assert b.execution.error.name == "TimeoutError" and "interrupted" in b.execution.error.value
    b.timed_out(2.5, restarted=True)
    assert "2.5 s" in b.execution.error.value and "restarted" in b.execution.error.value


def test_output_is_bounded_and_the_rest_counted():
    b = ExecutionBuilder(max_output_bytes=10)
    b.feed(msg("stream", name="stdout", text="12345678"))
    b.feed(msg("stream", name="stdout", text="abcdef"))  # over the budget: dropped
    b.feed(msg("stream", name="stderr", text="xy"))
    b.feed(msg("display_data", data={"text/plain": "z" * 100}, metadata={}))
    ex = b.execution
    assert ex.logs.stdout == ["12345678"] and ex.logs.stderr == ["xy"] and ex.results == []
    assert ex.dropped_bytes == 6 + 100


json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
                           lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4),
                           max_leaves=20)
msg_types = st.sampled_from(["status", "stream", "execute_result", "display_data", "error", "execute_input",
                             "clear_output", "comm_open", "nonsense"])


@given(st.lists(st.one_of(json_values, st.builds(lambda t, c: {"msg_type": t, "content": c}, msg_types, json_values),
                          st.builds(lambda t, c: {"header": {"msg_type": t}, "content": c}, msg_types,
                                    st.dictionaries(st.sampled_from(["name", "text", "data", "ename", "evalue",
                                                                     "traceback", "execution_count",
                                                                     "execution_state"]), json_values))),
                max_size=12))
def test_feed_is_total(messages):
    """Whatever the (guest's) kernel sends, feeding never raises and the Execution stays well-formed."""
    b = ExecutionBuilder(max_output_bytes=1000)
    for m in messages:
        b.feed(m)
    ex = b.execution
    assert all(isinstance(s, str) for s in ex.logs.stdout + ex.logs.stderr)
    assert all(isinstance(r, Result) for r in ex.results)
    assert ex.error is None or isinstance(ex.error.traceback, str)
    assert ex.execution_count is None or isinstance(ex.execution_count, int)
    json.loads(ex.to_json())


def test_kernel_spec_carries_the_sandbox_options(tmp_path):
    from capsem_kernel.kernelspec import PROVISIONER_NAME
    from capsem_kernel.sandbox import _kernel_spec, _OneSpec
    spec = _kernel_spec({"memory_mb": 1024, "policy": str(tmp_path / "p.toml"), "use_pool": True})
    prov = spec.metadata["kernel_provisioner"]
    assert prov["provisioner_name"] == PROVISIONER_NAME
    assert prov["config"] == {"memory_mb": 1024, "policy": str(tmp_path / "p.toml"), "use_pool": True}
    assert spec.interrupt_mode == "message"  # a timeout's interrupt goes over the control channel
    assert _OneSpec(spec).get_kernel_spec("capsem") is spec


def test_provisioner_accepts_the_sandbox_options():
    """Every option the Sandbox passes is a configurable trait of the provisioner (jupyter_client
    passes them as keyword arguments: an unknown one would be silently ignored)."""
    import inspect

    from capsem_kernel import sandbox
    from capsem_kernel.provisioner import CapsemProvisioner
    src = inspect.getsource(sandbox.Sandbox.__init__)
    for name in ("memory_mb", "cpus", "use_pool", "share_mode", "policy", "image"):
        assert f'"{name}"' in src
        assert CapsemProvisioner.class_traits()[name].metadata.get("config") is True


def test_execution_defaults():
    ex = Execution()
    assert ex.text is None and ex.error is None and ex.network == [] and ex.network_complete is False


@given(json_values)
def test_parent_id_of_any_message(value):
    """Which request a message answers, for anything the guest's kernel could send."""
    from capsem_kernel.sandbox import _parent_id
    _parent_id(value)
    _parent_id({"parent_header": value})
    assert _parent_id({"parent_header": {"msg_id": "m"}}) == "m"
    assert _parent_id({"parent_header": ["msg_id"]}) is None and _parent_id("x") is None


async def test_async_sandbox_calls_do_not_inherit_the_callers_jupyter_loop():
    """jupyter_client's blocking calls run on the loop jupyter_core keeps in a ContextVar. A worker
    that inherits the caller's context would share that loop with every other worker (two sandboxes
    starting at once: "This event loop is already running", seen in CI). Each AsyncSandbox call runs
    in its own thread's context: the caller's loop is not there, and one sandbox keeps one loop."""
    import asyncio
    from jupyter_core.utils import _loop, ensure_event_loop

    from capsem_kernel.async_sandbox import _on, _worker

    callers = asyncio.new_event_loop()
    token = _loop.set(callers)
    a, b = _worker("a"), _worker("b")
    try:
        seen = await asyncio.gather(_on(a, _loop.get), _on(b, _loop.get))
        assert seen == [None, None]
        first, again, other = (await _on(a, ensure_event_loop), await _on(a, ensure_event_loop),
                               await _on(b, ensure_event_loop))
        assert first is again and first is not other and callers not in (first, other)
    finally:
        _loop.reset(token)
        callers.close()
        a.shutdown(wait=True)
        b.shutdown(wait=True)
