"""smolagents' code executor on a capsem Sandbox: every action of a `CodeAgent` runs in a kernel in
its own VM, egress only through the policy proxy.

    from smolagents import CodeAgent
    from capsem_kernel.integrations.smolagents import CapsemExecutor
    agent = CodeAgent(tools=[...], model=model, executor=CapsemExecutor(policy="policy.toml"))
    agent.run("...")
    agent.cleanup()   # stops the VM (or: with CapsemExecutor(...) as executor: ...)

A `RemotePythonExecutor` as smolagents' E2B one (tools are sent as source, the final answer comes
back as a FinalAnswerException the patched final_answer tool raises), with what capsem adds:
- requests the policy refused while an action ran are appended to its logs, one line each with
  rule, reason code and reason, so the model reads why the network failed (and on an error, in
  the error too); `executor.network` keeps every audit row of every action;
- packages install through the proxy: `install_packages` (tool requirements, additional imports)
  runs pip in the VM; `!pip install` in the agent's own code works too (the guest's Debian Python
  is "externally managed" (PEP 668); the VM is disposable, so the kernel gets
  PIP_BREAK_SYSTEM_PACKAGES=1 and packages land in /usr/local, already on sys.path).
"""

from __future__ import annotations

import base64
import io
import shlex
from typing import Any

from smolagents.local_python_executor import CodeOutput
from smolagents.monitoring import AgentLogger, LogLevel
from smolagents.remote_executors import RemotePythonExecutor
from smolagents.utils import AgentError

from ..mcp_server import network_lines, strip_ansi
from ..sandbox import Sandbox

INSTALL_TIMEOUT = 900.0  # seconds for one pip run in the guest (TCG guests are slow)
# pip in the kernel's environment, so `!pip install x` in an action behaves as on a dev machine
KERNEL_SETUP = ("import os as _os\n"
                "_os.environ.update(PIP_BREAK_SYSTEM_PACKAGES='1', PIP_ROOT_USER_ACTION='ignore',\n"
                "                   PIP_DISABLE_PIP_VERSION_CHECK='1')\n"
                "del _os\n")
PIP = ("python3 -m pip install --break-system-packages --root-user-action=ignore "
       "--disable-pip-version-check --progress-bar off")


def refused_lines(rows: list[dict]) -> list[str]:
    """The refused requests among audit rows, one line each (rule, code, reason)."""
    return network_lines([r for r in rows if r.get("decision") != "allow"])


def _with_refusals(text: str, rows: list[dict]) -> str:
    lines = refused_lines(rows)
    if not lines:
        return text
    sep = "" if not text or text.endswith("\n") else "\n"
    return text + sep + "[capsem] network requests refused by the sandbox policy:\n" + "\n".join(lines) + "\n"


def _image(b64: Any):
    """A PIL image of base64 PNG/JPEG data, None if it is not (the kernel's bytes: never trusted)."""
    try:
        import PIL.Image
        image = PIL.Image.open(io.BytesIO(base64.b64decode(b64, validate=False)))
        image.load()  # decode now: a truncated or hostile file fails here, not in the agent
        return image
    except Exception:  # noqa: BLE001 - anything PIL (or base64) raises on the kernel's bytes
        return None


def _main_output(execution) -> Any:
    for result in execution.results:
        if not result.is_main_result:
            continue
        for attr in ("png", "jpeg"):
            data = getattr(result, attr)
            if isinstance(data, str) and (image := _image(data)) is not None:
                return image
        for attr in ("text", "json", "markdown", "html", "latex", "svg"):
            value = getattr(result, attr)
            if value is not None:
                return value
    return None


class CapsemExecutor(RemotePythonExecutor):
    """A smolagents executor on a capsem Sandbox (one VM, started here unless `sandbox` is given).

    additional_imports: packages pip installs in the VM at start ("*" entries are skipped).
    sandbox: an existing Sandbox to use (not closed by cleanup()); else one is made from
        `sandbox_kwargs` (Sandbox's arguments: folder, policy, memory_mb, timeout, use_pool, ...).
    timeout: seconds per action (None: the sandbox's default); a timed-out action is an error.
    """

    def __init__(self, additional_imports: list[str] | tuple[str, ...] = (), logger: AgentLogger | None = None,
                 allow_pickle: bool = False, *, sandbox: Sandbox | None = None, timeout: float | None = None,
                 **sandbox_kwargs):
        super().__init__(list(additional_imports), logger or AgentLogger(level=LogLevel.INFO), allow_pickle)
        self.timeout = timeout
        self.network: list[dict] = []  # every audit row of every action, in order
        self._own_sandbox = sandbox is None
        self.sandbox = Sandbox(**sandbox_kwargs) if sandbox is None else sandbox
        try:
            setup = self.sandbox.run_code(KERNEL_SETUP)
            if setup.error is not None:
                raise AgentError(f"the capsem kernel setup failed: {setup.error.name}: {setup.error.value}", self.logger)
            self.installed_packages = self.install_packages([p for p in additional_imports if "*" not in p])
        except BaseException:
            self.cleanup()
            raise
        self.logger.log(f"capsem sandbox ready (kernel {self.sandbox.kernel_id})", level=LogLevel.INFO)

    def run_code_raise_errors(self, code: str) -> CodeOutput:
        execution = self.sandbox.run_code(code, timeout=self.timeout)
        self.network.extend(execution.network)
        logs = "".join(execution.logs.stdout)
        if execution.logs.stderr:
            logs += ("" if not logs or logs.endswith("\n") else "\n") + "[stderr]\n" + "".join(execution.logs.stderr)
        logs = _with_refusals(logs, execution.network)
        error = execution.error
        if error is not None:
            if error.name == self.FINAL_ANSWER_EXCEPTION:
                answer = self._deserialize_final_answer(error.value, self.allow_pickle)
                return CodeOutput(output=answer, logs=logs, is_final_answer=True)
            traceback = strip_ansi(error.traceback)
            raise AgentError(f"{logs}Executing code yielded an error:\n{error.name}: {error.value}\n{traceback}",
                             self.logger)
        return CodeOutput(output=_main_output(execution), logs=logs, is_final_answer=False)

    def install_packages(self, additional_imports: list[str]) -> list[str]:
        """pip install `additional_imports` in the VM (through the policy proxy); raises AgentError
        with pip's output and the refused requests when pip fails."""
        packages = [p for p in additional_imports if p]
        if not packages:
            return []
        last = self.sandbox.network_log(limit=1)
        after = last[-1]["id"] if last else 0
        result = self.sandbox.commands.run(f"{PIP} {' '.join(shlex.quote(p) for p in packages)}",
                                           timeout=INSTALL_TIMEOUT)
        rows = self.sandbox.network_log(after_id=after)
        self.network.extend(rows)
        if result.exit_code != 0:
            output = _with_refusals(result.stdout + result.stderr, rows)
            raise AgentError(f"pip install {' '.join(packages)} failed in the capsem sandbox "
                             f"(exit {result.exit_code}{', ' + result.error if result.error else ''}):\n{output}",
                             self.logger)
        self.sandbox.run_code("import importlib; importlib.invalidate_caches()")  # new dirs in site-packages
        self.logger.log(result.stdout, level=LogLevel.DEBUG)
        return packages

    def cleanup(self) -> None:
        """Stop the sandbox's VM if this executor started it (CodeAgent.cleanup() calls this)."""
        sandbox = getattr(self, "sandbox", None)
        if sandbox is not None and self._own_sandbox:
            sandbox.close()

    def __enter__(self) -> "CapsemExecutor":
        return self

    def __exit__(self, *exc) -> None:
        self.cleanup()
