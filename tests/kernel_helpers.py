"""Shared pieces of the capsem kernel tests (tests/test_kernel_*.py): real VMs, real ipykernel.

- `setup_kernelspecs()` (behind conftest.py's session fixture `capsem_kernelspecs`): installs the
  kernelspecs with `capsem kernel install --prefix` into a private prefix and puts it first on
  JUPYTER_PATH, so a clean checkout works and the tests never depend on (or change) a kernelspec
  installed elsewhere. Also gives all VMs of the session a private CAPSEM_RUNTIME_DIR, so leftover
  processes can be told apart from other users' VMs on the same machine.
- `vm_processes(*markers)`: capsem helper processes (host_helpers.helper_processes) of this session
  (runtime dir) or of a given shared folder (virtiofsd's command line names the folder).
- `execute(kc, code)`: run code, collect the iopub messages of that request until idle.
- `vm_exec(vm, argv)`: run a command in a VM through the agent's exec (a command, not a cell).
- `running_vm(config, env)`: a started VM (no kernel) for a module's attacks, stopped at the end.

Timeouts are generous: under TCG the guest is ~10x slower than KVM, and the machine is shared.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import queue
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from host_helpers import helper_processes

KERNEL = "capsem"
KERNEL_RO = "capsem-ro"
STARTUP_TIMEOUT = 300.0
CELL_TIMEOUT = 120.0
CAPSEM_CLI = [sys.executable, "-m", "capsem_vm.cli"]
BIN = Path(sys.executable).parent

_state: dict = {}


def setup_kernelspecs() -> dict:
    """Idempotent (once per process). Returns {"prefix", "jupyter_path", "runtime_dir", "base"}."""
    if _state:
        return _state
    base = Path(tempfile.mkdtemp(prefix="capsem-kt-"))
    os.chmod(base, 0o755)  # the non-root test's user reads the kernelspecs from here
    prefix = base / "prefix"
    for name, extra in ((KERNEL, []), (KERNEL_RO, ["--share-mode", "ro", "--display-name", "capsem ro"])):
        proc = subprocess.run(CAPSEM_CLI + ["kernel", "install", "--prefix", str(prefix), "--name", name] + extra,
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stdout + proc.stderr
    jupyter_path = prefix / "share" / "jupyter"
    runtime = base / "rt"
    runtime.mkdir(mode=0o700)
    saved = {k: os.environ.get(k) for k in ("JUPYTER_PATH", "CAPSEM_RUNTIME_DIR")}
    old = os.environ.get("JUPYTER_PATH")
    os.environ["JUPYTER_PATH"] = os.pathsep.join([str(jupyter_path)] + ([old] if old else []))
    os.environ["CAPSEM_RUNTIME_DIR"] = str(runtime)
    _state.update(base=base, prefix=prefix, jupyter_path=jupyter_path, runtime_dir=runtime, saved=saved)
    return _state


def teardown_kernelspecs() -> None:
    if not _state:
        return
    for key, value in _state["saved"].items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    shutil.rmtree(_state["base"], ignore_errors=True)
    _state.clear()


def vm_processes(*markers: str | os.PathLike) -> list[str]:
    """Capsem helper processes whose command line names one of `markers` (default: this session's
    runtime dir, which QEMU's and the vsock backend's command lines contain)."""
    keys = [str(m) for m in markers] or [str(_state["runtime_dir"])]
    return helper_processes(*keys)


def wait_gone(*markers, timeout: float = 30.0) -> float:
    """Wait until no helper process of `markers` is left; returns the seconds it took."""
    t0 = time.monotonic()
    while left := vm_processes(*markers):
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"VM processes left behind after {timeout:.0f} s: {left}")
        time.sleep(0.2)
    return time.monotonic() - t0


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (not reaped yet) is dead
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def qemu_pid(km) -> int | None:
    """The kernel VM's QEMU pid; None before QEMU runs (booting) or without a VM."""
    kernel_vm = km.provisioner.kernel_vm if km.provisioner is not None else None
    qemu = kernel_vm.vm.qemu if kernel_vm is not None else None
    return qemu.pid if qemu is not None else None


def execute(kc, code: str, timeout: float = CELL_TIMEOUT, allow_stdin: bool = False, stdin_reply=None,
            **kw) -> tuple[dict, list[dict]]:
    """Execute `code`; return (execute_reply, iopub messages of this request except status and
    execute_input). Messages of other (earlier) requests are skipped. `stdin_reply(request)` answers
    input_request messages."""
    msg_id = kc.execute(code, allow_stdin=allow_stdin, **kw)
    return collect(kc, msg_id, timeout, stdin_reply if allow_stdin else None, what=repr(code))


def collect(kc, msg_id: str, timeout: float = CELL_TIMEOUT, stdin_reply=None, what: str = "") -> tuple[dict, list[dict]]:
    """(shell reply, iopub outputs) of request `msg_id`, as for `execute`."""
    deadline = time.monotonic() + timeout
    outputs: list[dict] = []
    idle = False
    while not idle:
        if stdin_reply is not None:
            try:
                req = kc.get_stdin_msg(timeout=0.05)
            except queue.Empty:
                pass
            else:
                assert req["parent_header"]["msg_id"] == msg_id
                kc.input(stdin_reply(req))
        try:
            msg = kc.get_iopub_msg(timeout=0.2)
        except queue.Empty:
            if time.monotonic() > deadline:
                raise AssertionError(f"no idle status within {timeout} s for {what or msg_id}; got {outputs}")
            continue
        if msg["parent_header"].get("msg_id") != msg_id:
            continue
        if msg["msg_type"] == "status":
            idle = msg["content"]["execution_state"] == "idle"
        elif msg["msg_type"] != "execute_input":
            outputs.append(msg)
    reply = _shell_reply(kc, msg_id, max(1.0, deadline - time.monotonic()))
    return reply, outputs


def _shell_reply(kc, msg_id: str, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        msg = kc.get_shell_msg(timeout=max(0.1, deadline - time.monotonic()))
        if msg["parent_header"].get("msg_id") == msg_id:
            return msg


def stdout_of(outputs: list[dict], name: str = "stdout") -> str:
    return "".join(m["content"]["text"] for m in outputs
                   if m["msg_type"] == "stream" and m["content"]["name"] == name)


def run_ok(kc, code: str, timeout: float = CELL_TIMEOUT) -> str:
    """Execute `code`, assert it succeeded, return its stdout."""
    reply, outputs = execute(kc, code, timeout)
    errors = [m["content"] for m in outputs if m["msg_type"] == "error"]
    assert reply["content"]["status"] == "ok", (reply["content"], errors, stdout_of(outputs, "stderr"))
    return stdout_of(outputs)


def cell_json(kc, code: str, timeout: float = CELL_TIMEOUT):
    """Execute `code`, assert it succeeded, parse the last line it printed as JSON."""
    return json.loads(run_ok(kc, code, timeout).strip().splitlines()[-1])


@contextlib.contextmanager
def running_vm(config, env: dict[str, str]):
    """A started capsem_vm.vm.VM of `config`, with `env` (CAPSEM_RUNTIME_DIR, ...) set in
    os.environ from before it is made until it has stopped; the environment is restored after."""
    from capsem_kernel import loop_thread
    from capsem_vm.vm import VM
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        vm = VM(config)
        try:
            loop_thread.run_sync(vm.start(), timeout=400)
            yield vm
        finally:
            loop_thread.run_sync(vm.stop(), timeout=120)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def vm_exec(vm, argv: list[str], timeout: float = 300, **exec_kw) -> tuple[int, str, str]:
    """Run `argv` in `vm` through the agent's exec: (shell exit code, stdout, stderr)."""
    from capsem_kernel import loop_thread

    async def go():
        proc = await vm.control.exec(argv, **exec_kw)
        out, err = bytearray(), bytearray()
        async for fd, data in proc.output():
            (err if fd == 2 else out).extend(data)
        return proc.result.shell_code, out.decode(errors="replace"), err.decode(errors="replace")
    return loop_thread.run_sync(asyncio.wait_for(go(), timeout), timeout + 10)


def start_kernel(kernel_name: str = KERNEL, cwd: str | os.PathLike | None = None, **kw):
    """A blocking KernelManager + ready client (jupyter_client.start_new_kernel, generous timeout)."""
    from jupyter_client.manager import start_new_kernel
    t0 = time.monotonic()
    km, kc = start_new_kernel(kernel_name=kernel_name, startup_timeout=STARTUP_TIMEOUT,
                              cwd=str(cwd) if cwd else None, **kw)
    km.capsem_start_s = time.monotonic() - t0
    return km, kc


def stop_kernel(km, kc) -> None:
    try:
        kc.stop_channels()
    finally:
        if km.has_kernel:
            km.shutdown_kernel(now=True)
