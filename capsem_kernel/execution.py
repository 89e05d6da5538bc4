"""What one `Sandbox.run_code` produced, and the pure fold of a request's iopub messages into it.

Field names and shapes follow E2B's code-interpreter SDK (`Execution`, `Result`, `Logs`,
`ExecutionError`, `OutputMessage`), so agent frameworks' E2B adapters need only a few lines; capsem
adds `Execution.network`, the audit rows the execution caused (see sandbox.py for how they are
cut). No I/O here: `ExecutionBuilder.feed(msg)` takes jupyter_client message dicts, so it is
unit-tested without a kernel.

The messages come from the guest (the kernel is the attacker's): `feed` is total (anything
malformed is skipped, never raised) and bounded (`max_output_bytes` of text and mime data per
execution; the rest is dropped and counted in `Execution.dropped_bytes`).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

MAX_OUTPUT_BYTES = 64 << 20  # per execution: stdout + stderr + every mime bundle's data

# Result attributes for the mime types E2B names; everything else stays in `extra`
MIME_ATTRS = {
    "text/plain": "text", "text/html": "html", "text/markdown": "markdown", "image/svg+xml": "svg",
    "image/png": "png", "image/jpeg": "jpeg", "application/pdf": "pdf", "text/latex": "latex",
    "application/json": "json", "application/javascript": "javascript",
}


@dataclass
class OutputMessage:
    """One stdout/stderr chunk, as the on_stdout/on_stderr callbacks get it (E2B's shape)."""
    line: str
    timestamp: float
    error: bool = False

    def __str__(self) -> str:
        return self.line


@dataclass
class Logs:
    stdout: list[str] = field(default_factory=list)
    stderr: list[str] = field(default_factory=list)


@dataclass
class ExecutionError:
    name: str
    value: str
    traceback: str  # one string, as E2B has it (the kernel's traceback lines joined)

    def to_json(self) -> str:
        return json.dumps({"name": self.name, "value": self.value, "traceback": self.traceback})


@dataclass
class Result:
    """One display_data / execute_result: its mime bundle, with E2B's convenience attributes
    (`png`/`jpeg`/`pdf` are base64 text as Jupyter sends them)."""
    text: str | None = None
    html: str | None = None
    markdown: str | None = None
    svg: str | None = None
    png: str | None = None
    jpeg: str | None = None
    pdf: str | None = None
    latex: str | None = None
    json: Any = None
    javascript: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    is_main_result: bool = False  # the cell's value (execute_result), not a display()
    data: dict[str, Any] = field(default_factory=dict)  # the whole bundle, every mime type

    @classmethod
    def from_bundle(cls, data: dict, is_main_result: bool) -> "Result":
        result = cls(is_main_result=is_main_result, data=dict(data))
        for mime, value in data.items():
            attr = MIME_ATTRS.get(mime)
            if attr is None:
                result.extra[mime] = value
            else:
                setattr(result, attr, value)
        return result

    def formats(self) -> list[str]:
        """The convenience attributes that are set (E2B's names), then the extra mime types."""
        return [a for a in MIME_ATTRS.values() if getattr(self, a) is not None] + list(self.extra)

    def __str__(self) -> str:
        return self.text or ""


@dataclass
class Execution:
    results: list[Result] = field(default_factory=list)
    logs: Logs = field(default_factory=Logs)
    error: ExecutionError | None = None
    execution_count: int | None = None
    # capsem: the audit rows of this execution (docs/AUDIT.md columns, escaped for display), and
    # whether the audit barrier succeeded before they were read (False: rows may be missing)
    network: list[dict] = field(default_factory=list)
    network_complete: bool = False
    dropped_bytes: int = 0  # output past max_output_bytes, not kept

    @property
    def text(self) -> str | None:
        """text/plain of the cell's value (the main result), as E2B's Execution.text."""
        for r in self.results:
            if r.is_main_result:
                return r.text
        return None

    def to_json(self) -> str:
        def result(r: Result) -> dict:
            return {"is_main_result": r.is_main_result, "data": r.data}
        return json.dumps({
            "results": [result(r) for r in self.results],
            "logs": {"stdout": self.logs.stdout, "stderr": self.logs.stderr},
            "error": None if self.error is None else json.loads(self.error.to_json()),
            "execution_count": self.execution_count,
            "network": self.network, "network_complete": self.network_complete,
        }, default=str)


def _size(value: Any) -> int:
    if isinstance(value, str):
        return len(value)
    try:
        return len(json.dumps(value, default=str))
    except (TypeError, ValueError, RecursionError):
        return 0


class ExecutionBuilder:
    """Folds the iopub messages of one execute request into an `Execution`, calling the callbacks
    as output arrives. The caller passes only messages whose parent is the request."""

    def __init__(self, *, on_stdout: Callable | None = None, on_stderr: Callable | None = None,
                 on_result: Callable | None = None, on_error: Callable | None = None,
                 max_output_bytes: int = MAX_OUTPUT_BYTES):
        self.execution = Execution()
        self.idle = False
        self._callbacks = {"stdout": on_stdout, "stderr": on_stderr, "result": on_result, "error": on_error}
        self._budget = max_output_bytes

    def _take(self, size: int) -> bool:
        if size > self._budget:
            self.execution.dropped_bytes += size
            return False
        self._budget -= size
        return True

    def _call(self, name: str, arg: Any) -> None:
        cb = self._callbacks[name]
        if cb is not None:
            cb(arg)

    def feed(self, msg: Any) -> None:
        """One iopub message (a jupyter_client message dict). Never raises on what the kernel
        sent; exceptions of the caller's own callbacks propagate."""
        if not isinstance(msg, dict):
            return
        header = msg.get("header")
        msg_type = msg.get("msg_type") or (header.get("msg_type") if isinstance(header, dict) else None)
        content = msg.get("content")
        if not isinstance(content, dict):
            return
        if msg_type == "status":
            self.idle = self.idle or content.get("execution_state") == "idle"
        elif msg_type == "stream":
            self._stream(content)
        elif msg_type in ("execute_result", "display_data"):
            self._result(content, msg_type == "execute_result")
        elif msg_type == "error":
            self._error(content)
        elif msg_type == "execute_input":
            count = content.get("execution_count")
            if isinstance(count, int) and not isinstance(count, bool):
                self.execution.execution_count = count

    def _stream(self, content: dict) -> None:
        text = content.get("text")
        if not isinstance(text, str) or not text:
            return
        name = "stderr" if content.get("name") == "stderr" else "stdout"
        if not self._take(len(text)):
            return
        getattr(self.execution.logs, name).append(text)
        self._call(name, OutputMessage(text, time.time(), error=name == "stderr"))

    def _result(self, content: dict, main: bool) -> None:
        data = content.get("data")
        if not isinstance(data, dict) or not all(isinstance(k, str) for k in data):
            return
        if not self._take(sum(_size(v) for v in data.values())):
            return
        result = Result.from_bundle(data, main)
        if main:
            count = content.get("execution_count")
            if isinstance(count, int) and not isinstance(count, bool):
                self.execution.execution_count = count
        self.execution.results.append(result)
        self._call("result", result)

    def _error(self, content: dict) -> None:
        tb = content.get("traceback")
        lines = [t for t in tb if isinstance(t, str)] if isinstance(tb, list) else []
        error = ExecutionError(str(content.get("ename", "Error")), str(content.get("evalue", "")),
                               "\n".join(lines))
        if not self._take(len(error.traceback) + len(error.value)):
            error = ExecutionError(error.name, error.value[:1000], "")
        self.execution.error = error
        self._call("error", error)

    def timed_out(self, seconds: float, restarted: bool) -> None:
        """The execution did not finish in time: keep what came, and say so as its error."""
        what = "the kernel was restarted (it ignored the interrupt)" if restarted else "the kernel was interrupted"
        self.execution.error = ExecutionError("TimeoutError", f"execution timed out after {seconds:g} s; {what}", "")
