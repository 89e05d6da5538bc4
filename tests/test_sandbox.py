"""The Sandbox API end to end: one real capsem kernel (one VM) for the module, driven only through
`capsem_kernel.Sandbox`; "the internet" is egress_world.World (real servers on 127.0.0.1 behind
the real proxy service). Pure parts: test_sandbox_unit.py.

The tests share the sandbox and run in file order; the last one closes it and checks nothing of
the VM is left.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import time

import pytest

from egress_world import World
from host_helpers import helper_processes

from capsem_kernel import loop_thread

pytestmark = pytest.mark.vm


class Env:
    pass


@pytest.fixture(scope="module")
def sb(image_dir, tmp_path_factory):
    from capsem_kernel import Sandbox
    tmp = tmp_path_factory.mktemp("sandbox")
    os.chmod(tmp, 0o755)
    mp = pytest.MonkeyPatch()
    e = Env()
    e.w = loop_thread.run_sync(World.create(tmp), timeout=180)
    try:
        e.rt = tmp / "rt"
        e.rt.mkdir(mode=0o700)
        mp.setenv("CAPSEM_RUNTIME_DIR", str(e.rt))  # this module's VMs, told apart from others'
        t0 = time.monotonic()
        # use_pool (the default): no pool answers in this runtime dir, so the claim falls back to a cold start
        e.sandbox = Sandbox(policy=e.w.policy_file, timeout=300)
        print(f"\nSandbox() -> ready {time.monotonic() - t0:.1f} s; {e.sandbox.info().get('timings')}")
        yield e
    finally:
        if hasattr(e, "sandbox"):
            e.sandbox.close()
        loop_thread.run_sync(e.w.close(), timeout=60)
        mp.undo()


PNG = ("iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg==")


def test_stdout_stderr_results_png_error(sb):
    chunks = []
    ex = sb.sandbox.run_code(
        "import sys, base64\n"
        "from IPython.display import Image, HTML, display\n"
        "print('out 1', flush=True); print('err 1', file=sys.stderr, flush=True); print('out 2')\n"
        f"display(Image(data=base64.b64decode('{PNG}'), format='png'))\n"
        "display(HTML('<b>bold</b>'))\n"
        "6 * 7", on_stdout=chunks.append)
    assert ex.error is None, ex.error
    assert "".join(ex.logs.stdout) == "out 1\nout 2\n" and "".join(ex.logs.stderr) == "err 1\n"
    assert "".join(c.line for c in chunks) == "out 1\nout 2\n"
    assert ex.text == "42"
    png, html, main = ex.results
    assert base64.b64decode(png.png) == base64.b64decode(PNG) and not png.is_main_result
    assert html.html == "<b>bold</b>" and main.is_main_result
    ex = sb.sandbox.run_code("x = 1\nraise ValueError('nope')")
    assert (ex.error.name, ex.error.value) == ("ValueError", "nope") and "ValueError" in ex.error.traceback
    assert ex.text is None


def test_timeout_interrupts_and_the_sandbox_stays_usable(sb):
    t0 = time.monotonic()
    ex = sb.sandbox.run_code("import time\nprint('before', flush=True)\nkept = 5\ntime.sleep(600)", timeout=8)
    took = time.monotonic() - t0
    assert ex.error.name == "TimeoutError" and "interrupted" in ex.error.value
    assert ex.logs.stdout == ["before\n"]
    assert took < 8 + 30, took
    assert sb.sandbox.run_code("kept * 2").text == "10"  # same kernel: interrupted, not restarted
    assert sb.sandbox.is_alive()


GET = ("import urllib.request, urllib.error\n"
       "def get(u):\n"
       "    try:\n"
       "        return urllib.request.urlopen(u, timeout=120).status\n"
       "    except urllib.error.HTTPError as e:\n"
       "        return e.code\n")


def test_network_rows_allowed_and_refused(sb):
    https = f"https://api.test.example:{sb.w.HTTPS}"
    # the refused request is the cell's last line: its row must be there all the same
    ex = sb.sandbox.run_code(GET + f"print(get({https + '/echo/sandbox-allowed'!r}))\n"
                             f"get({'http://blocked.test.example:%d/x' % sb.w.HTTP!r})\n"
                             f"get({https + '/admin/sandbox-refused'!r})")
    assert ex.error is None, ex.error
    assert ex.logs.stdout == ["200\n"] and ex.text == "403"
    assert ex.network_complete
    allowed = [r for r in ex.network if r["kind"] == "http" and "/echo/sandbox-allowed" in (r["url"] or "")]
    refused = [r for r in ex.network if r["kind"] == "http" and "/admin/sandbox-refused" in (r["url"] or "")]
    blocked = [r for r in ex.network if r["host"] == "blocked.test.example" and r["decision"] == "deny"]
    assert [(r["decision"], r["rule"], r["code"], r["status"]) for r in allowed] == [("allow", "api", "rule-allow", 200)]
    assert [(r["decision"], r["rule"], r["code"]) for r in refused] == [("deny", "admin", "rule-deny")]
    assert blocked and {r["code"] for r in blocked} == {"default-deny"}
    assert sb.sandbox.network_log(after_id=ex.network[0]["id"] - 1)[:len(ex.network)] == ex.network


def test_back_to_back_executions_never_share_rows(sb):
    https = f"https://api.test.example:{sb.w.HTTPS}"
    one = sb.sandbox.run_code(GET + f"get({https + '/echo/b2b-one'!r})")
    two = sb.sandbox.run_code(f"get({https + '/echo/b2b-two'!r})")
    assert one.text == "200" and two.text == "200"
    urls = [[r["url"] or "" for r in ex.network if r["kind"] == "http"] for ex in (one, two)]
    assert any("b2b-one" in u for u in urls[0]) and not any("b2b-two" in u for u in urls[0])
    assert any("b2b-two" in u for u in urls[1]) and not any("b2b-one" in u for u in urls[1])
    assert not {r["id"] for r in one.network} & {r["id"] for r in two.network}
    assert max(r["id"] for r in one.network) < min(r["id"] for r in two.network)
    assert sb.sandbox.run_code("1").network == []  # no traffic, no rows


def test_rows_caused_before_an_execution_are_not_its_own(sb):
    """A command's request just before run_code: its rows are the command's (network_log), not
    the execution's, even though they may still be queued in a writer when the cell is sent."""
    s = sb.sandbox
    url = f"https://api.test.example:{sb.w.HTTPS}/echo/before-the-cell"
    for i in range(3):
        r = s.commands.run(f"curl -s -o /dev/null -w '%{{http_code}}' {url}-{i}")
        assert r.stdout == "200", r
        ex = s.run_code("2")
        assert ex.text == "2" and ex.network == [], ex.network
        assert any(f"before-the-cell-{i}" in (row["url"] or "") for row in s.network_log())


def test_commands_run_in_the_vm_and_folder(sb):
    s = sb.sandbox
    seen = []
    r = s.commands.run("echo out; echo err >&2; pwd; echo \"$CAPSEM_X\"; exit 3", env={"CAPSEM_X": "from env"},
                       on_stdout=seen.append)
    assert r.exit_code == 3 and r.stderr == "err\n" and r.error is None
    assert r.stdout == f"out\n{s.folder}\nfrom env\n" and "".join(m.line for m in seen) == r.stdout
    # the guest, not the host: the kernel of the same VM sees what the command wrote
    assert s.commands.run("uname -n > from-shell.txt; cat /proc/1/comm").exit_code == 0
    assert (s.folder / "from-shell.txt").exists()
    assert s.run_code("open('from-shell.txt').read().strip() == __import__('socket').gethostname()").text == "True"
    assert s.commands.run("ls", cwd="/").stdout.split().count("proc") == 1
    t0 = time.monotonic()
    r = s.commands.run("echo started; sleep 600", timeout=3)
    assert r.exit_code == 124 and "timed out" in r.error and r.stdout == "started\n"
    assert time.monotonic() - t0 < 30


def test_cell_ignoring_sigint_gets_a_bounded_restart(sb):
    s = sb.sandbox
    s.run_code("marker = 'old kernel'")
    pid_before = s.info()["kernel_pid"]
    s.interrupt_grace = 5.0
    try:
        ex = s.run_code("import signal, time\nsignal.signal(signal.SIGINT, signal.SIG_IGN)\n"
                        "print('ignoring', flush=True)\ntime.sleep(600)", timeout=5)
    finally:
        s.interrupt_grace = 30.0
    assert ex.error.name == "TimeoutError" and "restarted" in ex.error.value
    assert ex.logs.stdout == ["ignoring\n"]
    assert s.is_alive()
    assert s.run_code("'marker' in dir()").text == "False"  # a fresh kernel in a fresh VM
    assert s.run_code("print('again')").logs.stdout == ["again\n"]
    assert s.info()["state"] == "ready" and pid_before is not None


POOL_MEMORY, POOL_CPUS = 512, 1


def pool_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "capsem_vm.cli", "pool", *args], capture_output=True, text=True,
                          timeout=timeout)


def test_warm_sandbox_from_the_pool(sb):
    """With a pool of this flavour running, Sandbox() claims a warm VM: the kernel's own policy,
    audit id and per-execution rows, as for a cold one."""
    out = pool_cli("start", "--size", "1", "--memory", str(POOL_MEMORY), "--cpus", str(POOL_CPUS))
    assert out.returncode == 0, out.stdout + out.stderr
    from capsem_kernel import Sandbox
    warm = None
    try:
        deadline = time.monotonic() + 900
        while not any(v["state"] == "ready" for v in json.loads(pool_cli("status", "--json").stdout)["vms"]):
            assert time.monotonic() < deadline, "no pooled VM ready within 900 s"
            time.sleep(1)
        t0 = time.monotonic()
        warm = Sandbox(policy=sb.w.policy_file, memory_mb=POOL_MEMORY, cpus=POOL_CPUS)
        ready = time.monotonic() - t0
        ex = warm.run_code(GET + f"get({'https://api.test.example:%d/echo/warm' % sb.w.HTTPS!r})")
        first = time.monotonic() - t0
        print(f"\nwarm Sandbox(): ready {ready:.2f} s, first result {first:.2f} s")
        info = warm.info()
        assert info["pooled"] is True and info["egress"]["kernel_id"] == warm.kernel_id != sb.sandbox.kernel_id
        assert ex.text == "200" and ex.network_complete
        assert [(r["decision"], r["rule"]) for r in ex.network if r["kind"] == "http"] == [("allow", "api")]
        assert str(warm.folder) == warm.commands.run("pwd").stdout.strip()
    finally:
        if warm is not None:
            warm.close()
        stopped = pool_cli("stop")
        assert stopped.returncode == 0, stopped.stdout + stopped.stderr


def test_close_leaves_no_vm_and_removes_the_temporary_folder(sb):
    s = sb.sandbox
    folder = s.folder
    assert folder.is_dir() and helper_processes(str(sb.rt))
    s.close()
    s.close()  # idempotent
    assert not s.is_alive()
    assert not folder.exists()
    deadline = time.monotonic() + 30
    while left := helper_processes(str(sb.rt), str(folder)):  # QEMU, vsock backend; virtiofsd
        assert time.monotonic() < deadline, f"VM processes left after close: {left}"
        time.sleep(0.2)
    with pytest.raises(Exception, match="closed"):
        s.run_code("1")
    with pytest.raises(Exception, match="closed"):
        s.commands.run("true")
