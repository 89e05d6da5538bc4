"""`capsem mcp`: an MCP server (official `mcp` SDK) whose tools run code in a capsem Sandbox.

One sandbox (one kernel in its own VM, egress only through the policy proxy) per MCP session. Over
stdio a session is the server process, so: the sandbox starts on the first tool call (listing
tools boots nothing), is closed when the client goes away (stdin closed, SIGTERM or SIGINT), and
after `idle_timeout` seconds without a call (the next call then starts a fresh one and says so).

Tools: run_code (text, and PNG/JPEG results as MCP image content), run_command (a shell in the same
VM and folder, exit code), read_file / write_file / list_files (Sandbox.files: through the guest
agent, beneath the folder only, no link followed: capsem_kernel/files.py), restart, network_log
(the sandbox's audit rows). Over streamable HTTP (mcp_http.py) each MCP session gets its own
holder, so its own sandbox.

The formatting of results into MCP content is pure (content_for_execution, text_for_command,
network_lines) and tested without a VM in tests/test_mcp_unit.py.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import re
import signal
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

log = logging.getLogger(__name__)

IDLE_TIMEOUT = 3600.0     # seconds without a tool call before the sandbox is closed (0: never)
NETWORK_LOG_LIMIT = 100   # default rows of the network_log tool (the Sandbox caps at 5000)
READ_FILE_LIMIT = 4 * 1024 * 1024  # bytes read_file returns (an agent's context is smaller still)
IMAGE_MIMES = {"png": "image/png", "jpeg": "image/jpeg"}
_ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]")

INSTRUCTIONS = (
    "Runs Python code and shell commands in a capsem sandbox: a Jupyter kernel in its own VM, whose "
    "network traffic goes only through a policy proxy (requests the policy refuses fail; every "
    "request is audited). State (variables, files in the working folder) persists between calls "
    "until restart. Each run_code result lists the network requests the code made, refused ones "
    "with the rule and reason.")


def strip_ansi(text: str) -> str:
    """Tracebacks come colored (IPython); an agent reads plain text."""
    return _ANSI.sub("", text)


def network_lines(rows: list[dict]) -> list[str]:
    """One line per audit row: decision, what, and for a refusal the rule, code and reason."""
    lines = []
    for r in rows:
        what = " ".join(str(x) for x in (r.get("method"), r.get("url") or r.get("host")) if x)
        line = f"{r.get('decision') or '?'} {r.get('kind') or '?'} {what}".rstrip()
        if r.get("status") is not None:
            line += f" -> {r['status']}"
        if r.get("decision") != "allow":
            why = ", ".join(str(r[k]) for k in ("rule", "code") if r.get(k))
            line += f" [{why}]" if why else ""
            line += f": {r['reason']}" if r.get("reason") else ""
        lines.append(line)
    return lines


def _image(result: Any) -> tuple[str, str] | None:
    """(base64 data, mime type) of a PNG/JPEG result whose data really is base64 (the guest's
    kernel sends it: anything else is left out, never passed on as an image)."""
    for attr, mime in IMAGE_MIMES.items():
        data = getattr(result, attr, None)
        if isinstance(data, str) and data:
            try:
                raw = base64.b64decode("".join(data.split()), validate=True)
            except (binascii.Error, ValueError):
                return None
            return base64.b64encode(raw).decode("ascii"), mime
    return None


def content_for_execution(execution: Any) -> list[dict]:
    """An Execution as MCP content: one text block (stdout, stderr, results' text, error, network),
    then one image block per PNG/JPEG result. Plain dicts ({"type": "text"|"image", ...}); the
    server makes them SDK content blocks."""
    parts: list[str] = []
    images: list[dict] = []
    if execution.logs.stdout:
        parts.append("[stdout]\n" + "".join(execution.logs.stdout).rstrip("\n"))
    if execution.logs.stderr:
        parts.append("[stderr]\n" + "".join(execution.logs.stderr).rstrip("\n"))
    for result in execution.results:
        image = _image(result)
        if image is not None:
            images.append({"type": "image", "data": image[0], "mimeType": image[1]})
            parts.append(f"[image {image[1]}]")
        elif result.text is not None:
            parts.append(("[result]\n" if result.is_main_result else "[display]\n") + result.text)
    if execution.error is not None:
        err = execution.error
        tb = strip_ansi(err.traceback).rstrip("\n")
        parts.append(f"[error] {err.name}: {err.value}" + (f"\n{tb}" if tb else ""))
    if execution.network:
        refused = sum(1 for r in execution.network if r.get("decision") != "allow")
        parts.append(f"[network] {len(execution.network)} audit rows, {refused} refused\n"
                     + "\n".join(network_lines(execution.network)))
    if getattr(execution, "dropped_bytes", 0):
        parts.append(f"[note] {execution.dropped_bytes} bytes of output past the limit were dropped")
    text = "\n".join(parts) if parts else "(no output)"
    return [{"type": "text", "text": text}, *images]


def text_for_command(result: Any) -> str:
    parts = [f"exit code: {result.exit_code}"]
    if result.error:
        parts.append(f"[error] {result.error}")
    if result.stdout:
        parts.append("[stdout]\n" + result.stdout.rstrip("\n"))
    if result.stderr:
        parts.append("[stderr]\n" + result.stderr.rstrip("\n"))
    if getattr(result, "dropped_bytes", 0):
        parts.append(f"[note] {result.dropped_bytes} bytes of output past the limit were dropped")
    return "\n".join(parts)


@dataclass
class SandboxHolder:
    """The session's one sandbox: made by `factory` on first use, closed after `idle_timeout` s
    without use (a call in progress is never cut) and by close(). Thread-safe: tool calls run on
    the SDK's worker threads."""
    factory: Callable[[], Any]
    idle_timeout: float = IDLE_TIMEOUT
    clock: Callable[[], float] = time.monotonic
    _sandbox: Any = None
    _busy: int = 0
    _last_used: float = 0.0
    _closed_idle: bool = False
    _closed: bool = False
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _start_lock: threading.Lock = field(default_factory=threading.Lock)

    def acquire(self) -> tuple[Any, str]:
        """(the sandbox, a note for the caller: '' or why it is a fresh one). Pair with release()."""
        with self._start_lock:  # one start at a time; others wait for it
            with self._lock:
                if self._closed:
                    raise RuntimeError("the MCP session is closing")
                sandbox, note = self._sandbox, ""
                self._busy += 1
            if sandbox is None or not sandbox.is_alive():
                try:
                    if sandbox is not None:  # its kernel died: free what is left before a new one
                        sandbox.close()
                        note = "a new sandbox was started: the previous one's kernel had died"
                    sandbox = self.factory()
                except BaseException:
                    with self._lock:
                        self._busy -= 1
                    raise
                with self._lock:
                    closing = self._closed
                    if self._closed_idle:
                        note = "a new sandbox was started: the previous one was closed after being idle"
                    self._sandbox, self._closed_idle = (None if closing else sandbox), False
                if closing:  # close() ran while this one started: it must not outlive the session
                    sandbox.close()
                    self.release()
                    raise RuntimeError("the MCP session is closing")
        return sandbox, note

    def release(self) -> None:
        with self._lock:
            self._busy -= 1
            self._last_used = self.clock()

    def current(self) -> Any:
        """The running sandbox, or None (no tool call has started one yet)."""
        with self._lock:
            return self._sandbox

    def close_if_idle(self) -> bool:
        """Close the sandbox if nothing used it for idle_timeout s; True if it did."""
        with self._lock:
            sandbox = self._sandbox
            if (sandbox is None or self._busy or self.idle_timeout <= 0
                    or self.clock() - self._last_used < self.idle_timeout):
                return False
            self._sandbox, self._closed_idle = None, True
        sandbox.close()
        return True

    def close(self) -> None:
        with self._lock:
            sandbox, self._sandbox, self._closed = self._sandbox, None, True
        if sandbox is not None:
            sandbox.close()


def _idle_watch(holder: SandboxHolder, stop: threading.Event) -> None:
    period = max(1.0, min(60.0, holder.idle_timeout / 10))
    while not stop.wait(period):
        try:
            if holder.close_if_idle():
                log.info("the sandbox was idle for %g s: closed", holder.idle_timeout)
        except Exception:  # noqa: BLE001 - a failing close must not end the watcher
            log.exception("closing the idle sandbox failed")


def text_for_file(data: bytes, path: str) -> str:
    """A file's bytes for an agent: the text if it is UTF-8, else base64 with a note."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return f"[binary file {path}: {len(data)} bytes, base64]\n" + base64.b64encode(data).decode("ascii")


def listing_lines(entries: list) -> str:
    """One line per entry: type, size, name (a folder's name ends with '/')."""
    return "\n".join(f"{e.type:7} {e.size:>12} {e.name}{'/' if e.type == 'dir' else ''}" for e in entries) or "(empty)"


def build_server(holder: SandboxHolder | None = None, *, holder_for: Callable[[Any], SandboxHolder] | None = None):
    """The MCPServer with capsem's tools, all working on `holder`'s sandbox, or on the sandbox of
    `holder_for(ctx)` (the tool call's MCP Context: one holder per HTTP session)."""
    from mcp.server.mcpserver import Context, MCPServer
    from mcp.types import ImageContent, TextContent

    server = MCPServer("capsem", instructions=INSTRUCTIONS)
    if holder_for is None:
        holder_for = lambda ctx: holder  # noqa: E731 - stdio: one session, one holder

    def blocks(content: list[dict], note: str) -> list:
        out = []
        for c in content:
            if c["type"] == "image":
                out.append(ImageContent(type="image", data=c["data"], mime_type=c["mimeType"]))
            else:
                out.append(TextContent(type="text", text=(f"[note] {note}\n" if note else "") + c["text"]))
                note = ""
        return out

    def tool(fn):
        # The SDK finds the Context parameter by its type; this module's annotations are strings
        # (PEP 563) that would be resolved in the module's globals, where Context is not imported.
        fn.__annotations__ = {**fn.__annotations__, "ctx": Context}
        return server.tool(structured_output=False)(fn)

    def with_sandbox(fn: Callable[[Any], list[dict]], ctx: Any = None) -> list:
        from mcp.server.mcpserver.exceptions import ToolError

        from .files import FilesError
        session = holder_for(ctx)
        sandbox, note = session.acquire()
        try:
            return blocks(fn(sandbox), note)
        except FilesError as exc:  # the agent should see why (refused path, not found, too large)
            raise ToolError(f"{exc.code}: {exc}") from None
        finally:
            session.release()

    @tool
    def run_code(code: str, ctx: Context, timeout: float | None = None) -> list:
        """Run Python code in the sandbox's Jupyter kernel (IPython: `!cmd` and `%magic` work; state
        persists between calls). Returns stdout, stderr, the value of the last line, errors with
        traceback, the network requests the code made (refused ones with rule and reason), and
        images (PNG/JPEG displays, e.g. matplotlib figures) as image content. `timeout` (seconds)
        interrupts the code and keeps the kernel (restarted only if it ignores the interrupt)."""
        return with_sandbox(lambda sb: content_for_execution(sb.run_code(code, timeout=timeout)), ctx)

    @tool
    def run_command(command: str, ctx: Context, timeout: float | None = None, cwd: str | None = None) -> list:
        """Run a shell command (/bin/sh -c) in the sandbox's VM, in its working folder by default,
        beside the kernel (same files, same network policy). Returns the exit code (124: killed
        for the timeout), stdout and stderr."""
        return with_sandbox(lambda sb: [{"type": "text", "text": text_for_command(
            sb.commands.run(command, cwd=cwd, timeout=timeout))}], ctx)

    @tool
    def restart(ctx: Context) -> list:
        """Replace the kernel with a fresh one in a fresh VM: variables and installed packages are
        gone, files in the working folder stay."""
        def do(sb):
            sb.restart()
            return [{"type": "text", "text": "restarted: a fresh kernel in a fresh VM (the folder is kept)"}]
        return with_sandbox(do, ctx)

    @tool
    def network_log(ctx: Context, after_id: int = 0, limit: int = NETWORK_LOG_LIMIT) -> list:
        """The sandbox's network audit rows (everything its code and commands did: allowed and
        refused requests with rule, reason code and reason), oldest first, the newest `limit` of
        those with id > after_id, as JSON."""
        return with_sandbox(lambda sb: [{"type": "text", "text": json.dumps(
            sb.network_log(after_id=max(0, after_id), limit=max(1, min(limit, 5000))), default=str)}], ctx)

    @tool
    def read_file(path: str, ctx: Context) -> list:
        """Read a file of the sandbox's working folder (relative path, or absolute within the
        folder): its text, or base64 for a binary file (at most 4 MiB). Links are not followed."""
        return with_sandbox(lambda sb: [{"type": "text", "text": text_for_file(
            sb.files.read(path, format="bytes", max_bytes=READ_FILE_LIMIT), path)}], ctx)

    @tool
    def write_file(path: str, content: str, ctx: Context, base64_encoded: bool = False) -> list:
        """Create or replace a file in the sandbox's working folder (missing folders are made).
        `content` is text, or base64 when base64_encoded is true."""
        try:
            data = base64.b64decode(content, validate=True) if base64_encoded else content.encode("utf-8")
        except (binascii.Error, ValueError):
            from mcp.server.mcpserver.exceptions import ToolError
            raise ToolError("content is not valid base64") from None

        def do(sb):
            info = sb.files.write(path, data)
            return [{"type": "text", "text": f"wrote {len(data)} bytes to {info.path}"}]
        return with_sandbox(do, ctx)

    @tool
    def list_files(ctx: Context, path: str = "") -> list:
        """List a folder of the sandbox's working folder (default: the folder itself): type, size
        and name per entry, sorted by name. Links are listed as 'symlink', not followed."""
        return with_sandbox(lambda sb: [{"type": "text", "text": listing_lines(sb.files.list(path))}], ctx)

    return server


@dataclass
class Options:
    folder: str | None = None
    policy: str | None = None
    memory_mb: int | None = None
    cpus: int | None = None
    image: str | None = None
    use_pool: bool = True
    timeout: float | None = None
    idle_timeout: float = IDLE_TIMEOUT
    keep_folder: bool = False

    def sandbox_kwargs(self) -> dict:
        kw: dict[str, Any] = {"folder": self.folder, "policy": self.policy, "image": self.image,
                              "use_pool": self.use_pool, "timeout": self.timeout, "keep_folder": self.keep_folder}
        if self.memory_mb is not None:
            kw["memory_mb"] = self.memory_mb
        if self.cpus is not None:
            kw["cpus"] = self.cpus
        return kw


def serve_stdio(options: Options) -> int:
    """Serve one MCP session over stdin/stdout until the client goes; the sandbox is closed then."""
    from .sandbox import Sandbox

    holder = SandboxHolder(lambda: Sandbox(**options.sandbox_kwargs()), idle_timeout=options.idle_timeout)
    server = build_server(holder)
    stop = threading.Event()
    if options.idle_timeout > 0:
        threading.Thread(target=_idle_watch, args=(holder, stop), name="capsem-mcp-idle", daemon=True).start()

    def on_term(signum, frame):  # the client's SIGTERM: leave through the finally below
        raise KeyboardInterrupt
    previous = signal.signal(signal.SIGTERM, on_term)
    try:
        server.run("stdio")
    except KeyboardInterrupt:
        pass
    finally:
        stop.set()
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not cut the close short
        try:
            holder.close()
        finally:
            signal.signal(signal.SIGTERM, previous)
    return 0
