"""Capsem kernels placed through Ray (issue 18): real Ray, real VMs, on this one machine.

The test starts a local Ray cluster (one node: this machine) whose raylet, and so every CapsemNode
actor, has its own CAPSEM_RUNTIME_DIR, data dir (its audit database) and config dir, apart from
the front end's (this process's), as a separate node would; its node name comes from the
`capsem-node-alpha` resource. "The internet" is a plain HTTP server on this machine's own address
(hostname -I), reached by the guest through the node's policy proxy. The multi-node form (each
node a raylet in its own network + mount namespace) is tests/ray_world.py's (wp-raycluster).

Modules' VMs run one after another: the Sandbox's (run, files, info, network rows), the
jupyter_kernel_test suite's, the lifecycle kernel's (interrupt, restart, shutdown), the killed one.
"""

from __future__ import annotations

import http.server
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

import test_kernel_jkt as jkt_base
from host_helpers import helper_processes
from kernel_helpers import CAPSEM_CLI, CELL_TIMEOUT, collect, execute, run_ok, start_kernel, stop_kernel
from raw_upstream import own_ipv4

ray = pytest.importorskip("ray")

pytestmark = [pytest.mark.vm, pytest.mark.timeout(1500)]

KERNEL_RAY = "capsem-ray"
NODE = "alpha"
DEATH_BOUND = 15.0  # s from the actor's SIGKILL to a dead kernel (seen at once: the TLS connection closes)


class Env:
    pass


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802
        body = f"served {self.path}".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def _dirs(base: Path, *names: str) -> dict[str, Path]:
    out = {}
    for name in names:
        out[name] = base / name
        out[name].mkdir(mode=0o700)
    return out


@pytest.fixture(scope="module")
def rw(capsem_kernelspecs, tmp_path_factory):
    from capsem_kernel.ray.provisioner import ensure_registered
    e = Env()
    tmp = tmp_path_factory.mktemp("ray-kernel")
    os.chmod(tmp, 0o755)
    e.tmp = tmp
    e.own = own_ipv4()
    if e.own is None:
        pytest.fail("hostname -I lists no non-loopback IPv4 address of this machine")
    e.server = http.server.ThreadingHTTPServer((e.own, 0), _Handler)
    e.port = e.server.server_address[1]
    threading.Thread(target=e.server.serve_forever, daemon=True).start()
    e.node = _dirs(tmp, "node-rt", "node-data", "node-config")
    e.front = _dirs(tmp, "front-rt", "front-data", "front-config")
    mp = pytest.MonkeyPatch()
    # what the node's raylet, and so its actors and their VMs, inherit: a node's own dirs
    mp.setenv("CAPSEM_RUNTIME_DIR", str(e.node["node-rt"]))
    mp.setenv("CAPSEM_DATA_DIR", str(e.node["node-data"]))
    mp.setenv("CAPSEM_CONFIG_DIR", str(e.node["node-config"]))
    e.ray_tmp = tempfile.mkdtemp(prefix="capsem-rt-ray-")  # short: Ray's socket paths have a limit
    try:
        t0 = time.monotonic()
        ray.init(num_cpus=2, resources={"capsem": 2, f"capsem-node-{NODE}": 1}, include_dashboard=False,
                 _temp_dir=e.ray_tmp, log_to_driver=False)
        e.gcs = ray.get_runtime_context().gcs_address
        print(f"\nRay up in {time.monotonic() - t0:.1f} s ({e.gcs})")
        # the front end (this process): its own dirs
        mp.setenv("CAPSEM_RUNTIME_DIR", str(e.front["front-rt"]))
        mp.setenv("CAPSEM_DATA_DIR", str(e.front["front-data"]))
        mp.setenv("CAPSEM_CONFIG_DIR", str(e.front["front-config"]))
        e.policy = tmp / "policy" / "ray.toml"
        e.policy.parent.mkdir(mode=0o755)
        e.policy.write_text(f"""
[[rule]]
name = "ray-allowed"
host = "{e.own}"
port = {e.port}
paths = ["/allowed*"]
addresses = ["{e.own}/32"]
action = "allow"
reason = "the test server, allowed path"
""")
        os.chmod(e.policy, 0o644)
        prefix = capsem_kernelspecs["prefix"]
        proc = subprocess.run(CAPSEM_CLI + ["kernel", "install", "--prefix", str(prefix), "--name", KERNEL_RAY,
                                            "--ray", "auto", "--policy", str(e.policy)],
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        ensure_registered()  # the shared venv's metadata may predate the entry point
        yield e
    finally:
        ray.shutdown()
        mp.undo()
        e.server.shutdown()


def node_helpers(e) -> list[str]:
    return helper_processes(str(e.node["node-rt"])) + node_processes(e)


RAY_PROCESSES = (b"default_worker.py", b"raylet", b"gcs_server", b"dashboard", b"log_monitor", b"monitor.py",
                 b"runtime_env", b"ray/_private")


def node_processes(e) -> list[str]:
    """Any process (QEMU, virtiofsd, vsock backend, the proxy service) whose command line or
    environment names the node's runtime dir."""
    marker = str(e.node["node-rt"]).encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if (entry / "stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                continue
            cmdline = (entry / "cmdline").read_bytes()
            environ = (entry / "environ").read_bytes()
        except (OSError, IndexError):
            continue
        ray_own = cmdline.startswith(b"ray::") or any(k in cmdline for k in RAY_PROCESSES)
        if marker in cmdline or (marker in environ and not ray_own):  # not the node's own Ray processes
            text = cmdline.replace(b"\0", b" ").decode(errors="replace")[:200]
            found.append(f"{entry.name} {text}")
    return found


# the node's proxy service's code dir (a reused set of links) and its log: node-level, like a local
# Jupyter server's; not a VM's or a kernel's
NODE_LEVEL = ("proxy-code-", "proxy-", "ray", "pool")


def node_leftovers(e) -> list[str]:
    """Files of VMs or kernels left in the node's runtime dir (the `ray` dir itself may stay)."""
    rt = e.node["node-rt"]
    left = [str(p) for p in rt.iterdir() if not p.name.startswith(NODE_LEVEL) or p.name.startswith("proxy-vm")]
    ray_dir = rt / "ray"
    if ray_dir.exists():
        left += [str(p) for p in ray_dir.iterdir()]
    return left


def wait_clean(e, timeout: float = 60.0) -> float:
    t0 = time.monotonic()
    while (helpers := node_helpers(e)) or (files := node_leftovers(e)):
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"left on the node after {timeout:.0f} s: helpers {helpers}, "
                                 f"files {node_leftovers(e)}")
        time.sleep(0.3)
    return time.monotonic() - t0


# --- the Sandbox ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def sb(rw):
    from capsem_kernel import Sandbox
    t0 = time.monotonic()
    sandbox = Sandbox(policy=rw.policy, ray_address=rw.gcs, timeout=300, use_pool=False)
    print(f"\nSandbox(ray_address) ready in {time.monotonic() - t0:.1f} s on {sandbox.info().get('node')}")
    try:
        yield sandbox
    finally:
        sandbox.close()


def test_sandbox_runs_code_and_info_names_the_node(rw, sb):
    ex = sb.run_code("import os, socket; print(os.path.exists('/opt/capsem/capsem-agent')); 6 * 7")
    assert ex.error is None, ex.error
    assert ex.logs.stdout == ["True\n"] and ex.text == "42"
    info = sb.info()
    assert info["node"] == NODE and info["remote"] is True and info["kernel_id"] == sb.kernel_id
    deadline = time.monotonic() + 10  # the node reports state changes within a second
    while info["state"] != "ready" and time.monotonic() < deadline:
        time.sleep(0.2)
        info = sb.info()
    assert info["state"] == "ready" and info["runtime_dir"].startswith(str(rw.node["node-rt"]))
    # no folder given: a node-local one, the files API's root
    assert sb.folder.name.startswith("capsem-sandbox-") and [s["path"] for s in info["shares"]] == [str(sb.folder)]


def test_sandbox_files_through_the_node(sb):
    big = os.urandom(200_000)  # several relayed chunks each way
    sb.files.write("data/in.bin", big)
    sb.files.write("data/note.txt", "hello from the front end")
    assert sb.files.read("data/in.bin", format="bytes") == big
    assert sorted(e.name for e in sb.files.list("data")) == ["in.bin", "note.txt"]
    ex = sb.run_code("print(open('data/note.txt').read())")
    assert ex.logs.stdout == ["hello from the front end\n"], ex
    with pytest.raises(PermissionError):
        sb.files.read("../outside")


def test_network_rows_reach_the_front_end_tagged_with_the_node(rw, sb):
    from capsem_kernel.server.network import query
    from capsem_vm.proxy.audit import default_db_path, read_events
    base = f"http://{rw.own}:{rw.port}"
    ex = sb.run_code("import urllib.request, urllib.error\n"
                     "def get(u):\n"
                     "    try:\n"
                     "        return urllib.request.urlopen(u, timeout=60).status\n"
                     "    except urllib.error.HTTPError as e:\n"
                     "        return e.code\n"
                     f"print(get({base + '/allowed/ray-row'!r}))\n"
                     f"get({base + '/refused/ray-row'!r})")
    assert ex.error is None, ex.error
    assert ex.logs.stdout == ["200\n"] and ex.text == "403", ex
    assert ex.network_complete
    http_rows = [r for r in ex.network if r["kind"] == "http"]
    allowed = [r for r in http_rows if "/allowed/ray-row" in (r["url"] or "")]
    refused = [r for r in http_rows if "/refused/ray-row" in (r["url"] or "")]
    assert [(r["decision"], r["rule"], r["status"]) for r in allowed] == [("allow", "ray-allowed", 200)], http_rows
    assert [r["decision"] for r in refused] == ["deny"], http_rows
    assert {r["node"] for r in ex.network} == {NODE}
    # the front end's own database (what the server extension reads) holds them, tagged
    front_db = default_db_path()
    assert str(front_db).startswith(str(rw.front["front-data"]))
    rows = [r for r in read_events(front_db, kernel=sb.kernel_id) if r["kind"] == "http"]
    assert {r["node"] for r in rows} == {NODE} and len(rows) >= 2
    panel = query(front_db, sb.kernel_id, blocked=True)
    assert any("/refused/ray-row" in (r["url"] or "") and r["node"] == NODE for r in panel["rows"])
    # and the node wrote them in its own database, untagged (it is "this host" there)
    node_rows = read_events(rw.node["node-data"] / "audit.sqlite3", kernel=sb.kernel_id)
    assert any("/refused/ray-row" in (r["url"] or "") for r in node_rows)


def test_sandbox_close_leaves_nothing_on_the_node(rw, sb):
    folder = sb.folder
    sb.close()
    assert not sb.is_alive()
    took = wait_clean(rw)
    assert not folder.exists()
    print(f"\nnode clean {took:.1f} s after close")


# --- placement refusals -------------------------------------------------------------------------------

def test_a_node_resource_nobody_has_times_out_clearly(rw):
    from capsem_kernel import Sandbox
    from capsem_kernel.sandbox import SandboxError
    t0 = time.monotonic()
    with pytest.raises(SandboxError, match="no Ray node with a free 'capsem' resource and capsem-node-nowhere"):
        Sandbox(ray_address=rw.gcs, node_resources={"capsem-node-nowhere": 1}, placement_timeout=5, use_pool=False)
    assert time.monotonic() - t0 < 60
    assert not node_helpers(rw)


FOLDER_PROBE = r"""
import json, os, sys
os.makedirs(sys.argv[2], exist_ok=True)
from capsem_kernel import Sandbox
try:
    Sandbox(folder=sys.argv[2], ray_address=sys.argv[1], use_pool=False, placement_timeout=60)
    print(json.dumps({"started": True}))
except Exception as exc:
    cause = exc.__cause__
    print(json.dumps({"started": False, "error": str(exc), "code": getattr(cause, "code", None)}))
"""


@pytest.mark.parametrize("case", ["missing-on-node", "other-dir-at-same-path"])
def test_a_folder_the_node_cannot_see_is_refused_at_placement(rw, case):
    """The front end runs in its own mount namespace with a tmpfs the node does not have: its
    folder is either absent on the node, or a different directory at the same path there."""
    base = rw.tmp / f"shadow-{case}"
    base.mkdir()
    folder = base / "notebook"
    if case == "other-dir-at-same-path":
        folder.mkdir()  # the node's directory at this path; the front end's is on its tmpfs
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    script = f"mount -t tmpfs capsem-shadow {base} && exec {sys.executable} -c \"$0\" {rw.gcs} {folder}"
    proc = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", script, FOLDER_PROBE],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["started"] is False and out["code"] == "folder_unseen", out
    assert f"node {NODE} cannot use the folder {folder}" in out["error"]
    assert "mounts at the same path" in out["error"]
    assert not node_helpers(rw)


# --- jupyter_kernel_test on a Ray-placed kernel ------------------------------------------------------

class RayKernelTests(jkt_base.CapsemKernelTests):
    kernel_name = KERNEL_RAY

    @classmethod
    def setUpClass(cls) -> None:
        cls.km, cls.kc = start_kernel(KERNEL_RAY)
        print(f"Ray-placed capsem kernel started in {cls.km.capsem_start_s:.1f} s")


@pytest.fixture(autouse=True)
def _patient_suite(request):
    if request.cls is RayKernelTests:
        saved = jkt_base.jkt.TIMEOUT
        jkt_base.jkt.TIMEOUT = CELL_TIMEOUT
        yield
        jkt_base.jkt.TIMEOUT = saved
    else:
        yield


@pytest.fixture(scope="class", autouse=True)
def _cluster_for_class(request):
    if request.cls is RayKernelTests:
        request.getfixturevalue("rw")
    yield


# --- lifecycle ------------------------------------------------------------------------------------------

def _busy(kc, msg_id: str, timeout: float = CELL_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        msg = kc.get_iopub_msg(timeout=timeout)
        if (msg["parent_header"].get("msg_id") == msg_id and msg["msg_type"] == "status"
                and msg["content"]["execution_state"] == "busy"):
            return
    raise AssertionError("the cell never went busy")


def test_interrupt_restart_and_shutdown(rw):
    nb = rw.tmp / "nb-lifecycle"
    nb.mkdir()
    km, kc = start_kernel(KERNEL_RAY, cwd=nb)
    try:
        assert km.provisioner.placed_node["node"] == NODE
        assert run_ok(kc, "import os; open('made-by-the-kernel', 'w').write('x'); print(os.getcwd())").strip() == str(nb)
        assert (nb / "made-by-the-kernel").read_text() == "x"  # the folder, shared from the node
        msg_id = kc.execute("import time; time.sleep(600)")
        _busy(kc, msg_id)
        time.sleep(1)
        t0 = time.monotonic()
        km.interrupt_kernel()
        reply, outputs = collect(kc, msg_id, timeout=CELL_TIMEOUT)
        assert reply["content"]["status"] == "error" and reply["content"]["ename"] == "KeyboardInterrupt"
        print(f"\ninterrupt -> reply {time.monotonic() - t0:.2f} s")
        first_pid = km.provisioner.placed_node["actor_pid"]
        t0 = time.monotonic()
        km.restart_kernel(now=True)
        kc.wait_for_ready(timeout=300)
        print(f"restart -> ready {time.monotonic() - t0:.1f} s")
        assert km.provisioner.placed_node["actor_pid"] != first_pid  # a fresh actor, a fresh VM
        assert run_ok(kc, "print(1 + 1)").strip() == "2"
        assert not _pid_alive(first_pid)
    finally:
        stop_kernel(km, kc)
    took = wait_clean(rw)
    print(f"shutdown: node clean after {took:.1f} s")


def _pid_alive(pid: int) -> bool:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        time.sleep(0.2)
    return True


def test_killing_the_actor_mid_cell_gives_a_dead_kernel_and_a_clean_node(rw):
    nb = rw.tmp / "nb-kill"
    nb.mkdir()
    km, kc = start_kernel(KERNEL_RAY, cwd=nb)
    try:
        assert run_ok(kc, "print('up')").strip() == "up"
        msg_id = kc.execute("import time; time.sleep(600)")
        _busy(kc, msg_id)
        pid = km.provisioner.placed_node["actor_pid"]
        assert node_helpers(rw)
        t0 = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        while km.is_alive():
            assert time.monotonic() - t0 < DEATH_BOUND, "the front end did not see the kernel die"
            time.sleep(0.05)
        dead_after = time.monotonic() - t0
        info = km.provisioner.kernel_vm.info() if km.provisioner.kernel_vm else {}
        print(f"\nactor SIGKILL -> kernel dead {dead_after:.2f} s ({info.get('death_reason')})")
        assert "control connection" in (info.get("death_reason") or "")
        took = wait_clean(rw)
        print(f"node clean {took:.1f} s after the death was seen")
    finally:
        stop_kernel(km, kc)
