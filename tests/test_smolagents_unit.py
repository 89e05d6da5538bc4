"""The pure parts of capsem_kernel.integrations.smolagents (no VM): how refused requests are
written into an action's logs and which part of an execution becomes the action's output.
End to end with a real kernel and smolagents' CodeAgent: test_smolagents.py."""

from __future__ import annotations

import base64
import io

import PIL.Image
from hypothesis import given, strategies as st

from capsem_kernel.execution import Execution, Result
from capsem_kernel.integrations.smolagents import _image, _main_output, _with_refusals, refused_lines

ALLOWED = {"decision": "allow", "kind": "http", "method": "GET", "url": "https://pypi.org/simple/x/",
           "status": 200, "rule": "pypi-index", "code": "rule-allow", "reason": "read-only"}
DENIED = {"decision": "deny", "kind": "http", "method": "GET", "url": "https://api.test.example/admin",
          "status": 403, "rule": "admin", "code": "rule-deny", "reason": "admin is off limits"}
DEFAULT = {"decision": "deny", "kind": "connect", "host": "blocked.test.example", "code": "default-deny",
           "reason": "no rule allows blocked.test.example"}


def test_only_refused_rows_are_named_with_rule_code_and_reason():
    lines = refused_lines([ALLOWED, DENIED, DEFAULT])
    assert lines == ["deny http GET https://api.test.example/admin -> 403 [admin, rule-deny]: admin is off limits",
                     "deny connect blocked.test.example [default-deny]: no rule allows blocked.test.example"]


def test_logs_get_a_refusal_section_only_when_something_was_refused():
    assert _with_refusals("out\n", [ALLOWED]) == "out\n"
    assert _with_refusals("", []) == ""
    text = _with_refusals("status 403", [ALLOWED, DENIED])
    assert text.startswith("status 403\n[capsem] network requests refused by the sandbox policy:\n")
    assert text.endswith("admin is off limits\n") and "pypi.org" not in text


def _png() -> str:
    buf = io.BytesIO()
    PIL.Image.new("RGB", (2, 3)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def test_main_output_is_the_cell_value_image_first_then_text():
    display = Result.from_bundle({"text/plain": "shown"}, is_main_result=False)
    assert _main_output(Execution(results=[display])) is None
    main = Result.from_bundle({"text/plain": "42", "text/html": "<b>42</b>"}, is_main_result=True)
    assert _main_output(Execution(results=[display, main])) == "42"
    image = _main_output(Execution(results=[Result.from_bundle({"image/png": _png(), "text/plain": "<Figure>"}, True)]))
    assert isinstance(image, PIL.Image.Image) and image.size == (2, 3)
    # not an image after all (the guest's bytes): the text stands in
    fake = Result.from_bundle({"image/png": "bm90IGEgcG5n", "text/plain": "<Figure>"}, True)
    assert _main_output(Execution(results=[fake])) == "<Figure>"


@given(st.one_of(st.text(max_size=200), st.binary(max_size=200).map(lambda b: base64.b64encode(b).decode()),
                 st.integers(), st.none()))
def test_image_of_guest_bytes_never_raises(data):
    assert _image(data) is None or isinstance(_image(data), PIL.Image.Image)
