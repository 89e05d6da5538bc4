"""The warm VM pool with real VMs: `capsem pool` service, claims through the provisioner, shares
hot-plugged at the notebook's path (rw and ro), a fresh VM per kernel, refill, the private
control socket, pool death (claimed kernels live on, later kernels cold-start), clean stop.

One pool (2 x 512 MB, 1 CPU) for the module; tests run in file order (the death test kills it).
"""

from __future__ import annotations

import json
import os
import re
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

import kernel_helpers as kh

pytestmark = [pytest.mark.vm, pytest.mark.usefixtures("capsem_kernelspecs"), pytest.mark.timeout(1500)]

MEMORY, CPUS, SIZE = 512, 1, 2
FILL_TIMEOUT = 900.0


def capsem(*args, timeout=120) -> subprocess.CompletedProcess:
    return subprocess.run(kh.CAPSEM_CLI + list(args), capture_output=True, text=True, timeout=timeout)


def status() -> dict:
    out = capsem("pool", "status", "--json")
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def wait_ready(n: int, timeout: float = FILL_TIMEOUT) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        st = status()
        if sum(v["state"] == "ready" for v in st["vms"]) >= n:
            return st
        assert time.monotonic() < deadline, f"pool not refilled to {n} within {timeout} s: {st}"
        time.sleep(1)


def keeper_pids() -> list[int]:
    """Live keeper processes of this test session (their environment names our runtime dir)."""
    rt = str(kh._state["runtime_dir"]).encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmd = (entry / "cmdline").read_bytes()
            if b"capsem_vm.pool.keeper" not in cmd or not kh.pid_alive(int(entry.name)):
                continue
            if b"CAPSEM_RUNTIME_DIR=" + rt in (entry / "environ").read_bytes():
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def start_pool(size=SIZE, flavours=()):
    """`capsem pool start` of `size` VMs of MEMORY/CPUS, plus each --flavour in `flavours`."""
    more = [arg for flavour in flavours for arg in ("--flavour", flavour)]
    out = capsem("pool", "start", "--size", str(size), "--memory", str(MEMORY), "--cpus", str(CPUS), *more)
    assert out.returncode == 0, out.stdout + out.stderr
    return status()


def start_kernel(cwd, name=kh.KERNEL, **provisioner):
    from jupyter_client.manager import KernelManager
    from traitlets.config import Config
    c = Config()
    c.CapsemProvisioner.use_pool = True
    c.CapsemProvisioner.memory_mb = MEMORY
    c.CapsemProvisioner.cpus = CPUS
    for key, value in provisioner.items():
        setattr(c.CapsemProvisioner, key, value)
    t0 = time.monotonic()
    km = KernelManager(kernel_name=name, config=c)
    km.start_kernel(cwd=str(cwd))
    kc = km.client()
    kc.start_channels()
    kc.wait_for_ready(timeout=kh.STARTUP_TIMEOUT)
    km.capsem_start_s = time.monotonic() - t0
    return km, kc


@pytest.fixture(scope="module")
def pool():
    st = start_pool()
    yield st
    capsem("pool", "stop")


@pytest.fixture
def folder(tmp_path):
    d = tmp_path / "nb"
    d.mkdir()
    (d / "data.txt").write_text("from the host\n")
    os.chmod(tmp_path, 0o755)
    return d


def test_socket_private_and_peer_credentials_checked(pool):
    sock = kh._state["runtime_dir"] / "pool" / "pool.sock"
    assert stat.S_IMODE(sock.parent.stat().st_mode) == 0o700
    assert stat.S_IMODE(sock.stat().st_mode) == 0o600
    assert stat.S_ISSOCK(sock.stat().st_mode)
    probe = ("import socket,sys; s=socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)\n"
             "try:\n s.connect(sys.argv[1])\nexcept OSError as e:\n print('refused', e.errno); sys.exit(0)\n"
             "try:\n s.send(b'{\"t\":\"status\"}'); s.settimeout(20); print('answer', len(s.recv(65536)))\n"
             "except (BrokenPipeError, ConnectionResetError):\n print('answer 0')\n")
    # another user cannot even reach it (0700 dir) ...
    other = subprocess.run(["/usr/bin/python3", "-c", probe, str(sock)], user=65534, group=65534, extra_groups=[],
                           capture_output=True, text=True, timeout=60)
    assert other.stdout.strip() == "refused 13", other.stdout + other.stderr
    # ... and with the permissions opened up, the pool still refuses it by its peer credentials
    os.chmod(sock.parent, 0o755)
    os.chmod(sock.parent.parent, 0o755)
    os.chmod(sock, 0o666)
    try:
        other = subprocess.run(["/usr/bin/python3", "-c", probe, str(sock)], user=65534, group=65534,
                               extra_groups=[], capture_output=True, text=True, timeout=60)
    finally:
        os.chmod(sock, 0o600)
        os.chmod(sock.parent, 0o700)
        os.chmod(sock.parent.parent, 0o700)
    assert other.stdout.strip() == "answer 0", other.stdout + other.stderr  # closed unanswered
    mine = subprocess.run([sys.executable, "-c", probe, str(sock)], capture_output=True, text=True, timeout=60)
    assert mine.stdout.startswith("answer ") and mine.stdout.strip() != "answer 0"


def test_claims_share_rw_ro_at_same_path_fresh_vm_each(pool, folder):
    wait_ready(SIZE)
    km1, kc1 = start_kernel(folder)
    km2 = kc2 = None
    try:
        info1 = km1.provisioner.kernel_vm.info()
        assert info1["pooled"] is True and info1["shares"] == [{"path": str(folder), "readonly": False}]
        # the first connection on each channel went over the stream the keeper opened before the claim
        assert km1.provisioner.kernel_vm.forwarder.early_streams_used == 5  # primed before the claim
        assert km1.provisioner.kernel_vm.forwarder.greeting_mismatches == 0
        # the key went over while the folder attached; the code below ran once it was there
        assert info1["held"] is True and info1["attach_error"] is None
        assert km1.provisioner.kernel_vm.vm.attach_after == "first reply"  # not ATTACH_DELAY's timeout
        out = kh.run_ok(kc1, "import os; print(os.getcwd()); print(open('data.txt').read(), end='');"
                             "open('from_guest.txt','w').write('rw ok'); open('/root/leak','w').write('1');"
                             "os.environ['LEAK']='1'; print(os.path.exists('/root/leak'))")
        assert out.splitlines() == [str(folder), "from the host", "True"]
        assert (folder / "from_guest.txt").read_text() == "rw ok"
        # the second claim: another VM, read-only share, nothing of the first kernel's state
        km2, kc2 = start_kernel(folder, name=kh.KERNEL_RO)
        info2 = km2.provisioner.kernel_vm.info()
        assert info2["pooled"] is True and info2["shares"] == [{"path": str(folder), "readonly": True}]
        assert info2["runtime_dir"] != info1["runtime_dir"]
        assert km2.provisioner.kernel_vm.vm.qemu.pid != km1.provisioner.kernel_vm.vm.qemu.pid
        out = kh.run_ok(kc2, "import os, errno\nprint(os.getcwd(), open('data.txt').read().strip())\n"
                             "print(os.path.exists('/root/leak'), os.environ.get('LEAK'))\n"
                             "try:\n  open('ro.txt','w')\nexcept OSError as e:\n  print(errno.errorcode[e.errno])\n")
        assert out.splitlines() == [f"{folder} from the host", "False None", "EROFS"]
        assert not (folder / "ro.txt").exists()
        # each kernel's egress is its own: audit/kernel id is the kernel's
        assert info1["egress"]["kernel_id"] == km1.kernel_id and info2["egress"]["kernel_id"] == km2.kernel_id
    finally:
        dirs = [km.provisioner.kernel_vm.info()["runtime_dir"] for km in (km1, km2) if km is not None]
        kh.stop_kernel(km1, kc1)
        if km2 is not None:
            kh.stop_kernel(km2, kc2)
    for d in dirs:  # destroyed after use: never back in the pool
        kh.wait_gone(d, timeout=60)
        assert not Path(d).exists()
        assert d not in json.dumps(status())


def test_pool_refills_after_claims(pool):
    st = wait_ready(SIZE)
    assert st["claims"] >= 2
    assert len(st["vms"]) == SIZE and all(v["rss_mb"] and v["rss_mb"] < MEMORY + 200 for v in st["vms"])
    assert st["budget_mb"] == SIZE * MEMORY


def test_a_cell_sent_at_once_starts_the_attach_and_runs_first_in_the_folder(pool, folder):
    """A client that sends a cell right after start_channels (no kernel_info first): the held
    request itself starts the folder attach (not ATTACH_DELAY's timeout), and the cell runs in
    the folder with its files visible, as In[1] (the pre-started kernel's warm-up left no trace)."""
    from jupyter_client.manager import KernelManager
    from traitlets.config import Config
    wait_ready(1)
    c = Config()
    c.CapsemProvisioner.use_pool = True
    c.CapsemProvisioner.memory_mb = MEMORY
    c.CapsemProvisioner.cpus = CPUS
    km = KernelManager(kernel_name=kh.KERNEL, config=c)
    km.start_kernel(cwd=str(folder))
    kc = km.client()
    try:
        kc.start_channels()
        msg_id = kc.execute("import os", user_expressions={"cwd": "os.getcwd()", "files": "os.listdir()",
                                                           "In": "In"})
        while True:
            reply = kc.get_shell_msg(timeout=kh.STARTUP_TIMEOUT)
            if reply["parent_header"].get("msg_id") == msg_id:
                break
        kvm = km.provisioner.kernel_vm
        assert kvm.info()["pooled"] is True and kvm.info()["held"] is True
        assert kvm.vm.attach_after == "held request"
        content = reply["content"]
        assert content["status"] == "ok" and content["execution_count"] == 1, content
        got = {k: v["data"]["text/plain"] for k, v in content["user_expressions"].items()}
        assert got == {"cwd": repr(str(folder)), "files": "['data.txt']", "In": "['', 'import os']"}, got
    finally:
        kh.stop_kernel(km, kc)


def test_failed_attach_after_the_key_went_over_stops_the_kernel(pool, folder, caplog):
    """The folder attaches while the kernel already has its key (it holds every request but
    kernel_info until then). If the attach fails, the kernel must not live on without its folder:
    the VM is stopped, the kernel reported dead, and the reason logged. The fault: a device put on
    the spare root port of the VM the claim will get (the oldest ready one) through its QMP socket."""
    import asyncio
    from capsem_vm.qmp import Monitor
    from jupyter_client.manager import KernelManager
    from traitlets.config import Config
    st = wait_ready(SIZE)
    oldest = max((v for v in st["vms"] if v["state"] == "ready"), key=lambda v: v["age_s"])
    qmp_path = Path(os.readlink(f"/proc/{oldest['qemu_pid']}/cwd")) / "qmp.sock"  # QEMU runs in its VM dir

    async def block_spare_port():
        qmp = await Monitor.connect(str(qmp_path))
        try:
            await qmp.execute("device_add", {"driver": "virtio-rng-pci", "id": "blocker", "bus": "rp1"})
        finally:
            await qmp.close()
    asyncio.run(block_spare_port())
    caplog.set_level("ERROR")
    c = Config()
    c.CapsemProvisioner.use_pool = True
    c.CapsemProvisioner.memory_mb = MEMORY
    c.CapsemProvisioner.cpus = CPUS
    km = KernelManager(kernel_name=kh.KERNEL, config=c)
    km.start_kernel(cwd=str(folder))
    kc = km.client()
    try:
        kvm = km.provisioner.kernel_vm
        assert kvm.info()["pooled"] is True and kvm.vm.qemu.pid == oldest["qemu_pid"]
        deadline = time.monotonic() + 120
        while km.is_alive():
            assert time.monotonic() < deadline, "the kernel outlived its failed folder attach"
            time.sleep(0.2)
        # (QEMU may put the folder's device beside the blocker: then the guest never finds it)
        assert re.search(r"could not (hot-plug|mount) the (hot-plugged )?folder", kvm.attach_error or ""), \
            kvm.attach_error
        assert any("could not be attached" in r.getMessage() for r in caplog.records)
        vm_dir = kvm.info()["runtime_dir"]
    finally:
        kh.stop_kernel(km, kc)
    kh.wait_gone(vm_dir, timeout=60)
    assert not kh.pid_alive(oldest["qemu_pid"])
    # and this process claims again (a teardown cut short once left a stale reader on a reused fd)
    wait_ready(1)
    km, kc = start_kernel(folder)
    try:
        assert km.provisioner.kernel_vm.info()["pooled"] is True
        assert kh.run_ok(kc, "import os; print(os.getcwd())") == f"{folder}\n"
    finally:
        kh.stop_kernel(km, kc)


def test_pool_death_keeps_claimed_kernels_then_cold_start(pool, folder, caplog):
    wait_ready(1)
    km, kc = start_kernel(folder)
    km2 = kc2 = None
    try:
        assert km.provisioner.kernel_vm.info()["pooled"] is True
        st = status()
        unclaimed = [v["qemu_pid"] for v in st["vms"] if v["qemu_pid"]]
        os.kill(st["pid"], signal.SIGKILL)
        deadline = time.monotonic() + 120
        while any(kh.pid_alive(p) for p in unclaimed):  # unclaimed VMs die with the pool
            assert time.monotonic() < deadline, "unclaimed pooled VMs outlived the pool"
            time.sleep(0.5)
        assert kh.run_ok(kc, "print(6 * 7)") == "42\n"  # the claimed one lives on
        assert km.is_alive()
        caplog.set_level("WARNING")
        km2, kc2 = start_kernel(folder, pool_autostart=True, pool_size=1)
        assert km2.provisioner.kernel_vm.info()["pooled"] is False
        assert any("no warm VM pool" in r.getMessage() for r in caplog.records)
        deadline = time.monotonic() + 60  # pool_autostart: a new pool (this flavour) for later kernels
        while True:
            out = capsem("pool", "status", "--json")
            if out.returncode == 0:
                new = json.loads(out.stdout)
                break
            assert time.monotonic() < deadline, out.stderr
            time.sleep(0.5)
        assert new["pid"] != st["pid"] and (new["size"], new["memory_mb"], new["cpus"]) == (1, MEMORY, CPUS)
        assert kh.run_ok(kc2, "print(open('data.txt').read().strip())") == "from the host\n"
        assert kh.run_ok(kc, "print('still here')") == "still here\n"
    finally:
        dirs = [k.provisioner.kernel_vm.info()["runtime_dir"] for k in (km, km2) if k is not None]
        kh.stop_kernel(km, kc)
        if km2 is not None:
            kh.stop_kernel(km2, kc2)
    for d in dirs:  # the autostarted pool's VM is still booting: only these two must be gone
        kh.wait_gone(d, timeout=60)
        assert not Path(d).exists()


def test_pool_stop_leaves_no_processes():
    st = status() if capsem("pool", "status").returncode == 0 else start_pool(size=1)  # the autostarted one
    deadline = time.monotonic() + 300
    while not kh.vm_processes():  # stop it while its VM boots (the harder case)
        assert time.monotonic() < deadline, status()
        time.sleep(0.5)
    assert len(keeper_pids()) == 1  # the claimed VMs' keepers are gone with their kernels
    out = capsem("pool", "stop")
    assert out.returncode == 0, out.stderr
    kh.wait_gone(timeout=60)
    deadline = time.monotonic() + 30
    while keeper_pids() or kh.pid_alive(st["pid"]):
        assert time.monotonic() < deadline, (keeper_pids(), st["pid"])
        time.sleep(0.2)
    rt = kh._state["runtime_dir"]
    assert not (rt / "pool" / "pool.sock").exists()
    assert [p.name for p in rt.iterdir() if p.name.startswith("vm-")] == []
    assert capsem("pool", "status").returncode != 0


def test_pool_keeps_each_flavour_and_a_kernel_claims_its_own(folder):
    """`--flavour MB,CPUS,N` beside --memory/--cpus/--size: the pool keeps VMs of both flavours
    (status shows which is which); a kernel asking for the second flavour claims that VM, not the
    other; what it claimed is refilled with its own flavour."""
    other_mb = MEMORY + 128
    start_pool(1, [f"{other_mb},{CPUS},1"])
    try:
        st = wait_ready(2)
        assert st["flavours"] == [{"memory_mb": MEMORY, "cpus": CPUS, "size": 1, "image": None},
                                  {"memory_mb": other_mb, "cpus": CPUS, "size": 1, "image": None}]
        assert sorted(v["memory_mb"] for v in st["vms"]) == [MEMORY, other_mb]
        assert st["budget_mb"] == MEMORY + other_mb
        # a flavour the pool does not keep: refused with what it keeps and how to get it
        import asyncio
        from capsem_vm.image.store import resolve_image
        from capsem_vm.image.verify import read_manifest
        from capsem_vm.pool import client, wire
        digest = read_manifest(resolve_image(None))[1]
        claim, why = asyncio.run(client.claim(wire.Flavour(999, CPUS, digest)))
        assert claim is None and f"keeps no VMs of 999 MB/{CPUS} CPUs" in why and f"--flavour 999,{CPUS},N" in why
        small = next(v["qemu_pid"] for v in st["vms"] if v["memory_mb"] == MEMORY)
        big = next(v["qemu_pid"] for v in st["vms"] if v["memory_mb"] == other_mb)
        km, kc = start_kernel(folder, memory_mb=other_mb)
        try:
            kvm = km.provisioner.kernel_vm
            assert kvm.info()["pooled"] is True and kvm.info()["memory_mb"] == other_mb
            assert kvm.vm.qemu.pid == big
            assert kh.run_ok(kc, "import os; print(os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') > "
                                 f"{MEMORY} * 2**20)") == "True\n"  # the guest has the bigger memory
            st = status()
            assert [v["qemu_pid"] for v in st["vms"] if v["memory_mb"] == MEMORY] == [small]
            st = wait_ready(2)  # the claimed flavour is refilled
            assert sorted(v["memory_mb"] for v in st["vms"]) == [MEMORY, other_mb]
        finally:
            kh.stop_kernel(km, kc)
    finally:
        assert capsem("pool", "stop").returncode == 0
    kh.wait_gone(timeout=60)


def test_pool_keeps_a_flavour_of_another_image(folder):
    """`--flavour MB,CPUS,N,IMAGE`: warm VMs of another image beside the default image's; a kernel
    whose image is that one claims such a VM (its guest has what only that image has), a kernel of
    the default image the other; a claim for an image the pool keeps no VM of is told how to get one."""
    import asyncio

    from capsem_vm.image.store import resolve_image
    from capsem_vm.pool import client, wire
    built = capsem("image", "build", "--apt", "sl", timeout=1500)  # a recipe of its own: not the default
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    other = built.stdout.strip().splitlines()[-1]
    assert Path(other).is_dir() and Path(other).resolve() != resolve_image(None)
    start_pool(1, [f"{MEMORY},{CPUS},1,{other}"])
    try:
        st = wait_ready(2)
        assert st["flavours"] == [{"memory_mb": MEMORY, "cpus": CPUS, "size": 1, "image": None},
                                  {"memory_mb": MEMORY, "cpus": CPUS, "size": 1, "image": other}]
        by_image = {v["image"]: v["qemu_pid"] for v in st["vms"]}
        assert set(by_image) == {None, other}
        claim, why = asyncio.run(client.claim(wire.Flavour(MEMORY, CPUS, "0" * 64)))
        assert claim is None and "booted from this kernel's image" in why, why
        assert f"--flavour {MEMORY},{CPUS},N,IMAGE" in why
        sl = "import os; print(os.path.exists('/usr/games/sl'))"
        km, kc = start_kernel(folder, image=other)
        try:
            kvm = km.provisioner.kernel_vm
            assert kvm.info()["pooled"] is True and kvm.vm.qemu.pid == by_image[other]
            assert kh.run_ok(kc, sl) == "True\n"
            assert [v["qemu_pid"] for v in status()["vms"] if v["image"] is None] == [by_image[None]]
        finally:
            kh.stop_kernel(km, kc)
        km, kc = start_kernel(folder)  # the default image's kernel: the other VM
        try:
            kvm = km.provisioner.kernel_vm
            assert kvm.info()["pooled"] is True and kvm.vm.qemu.pid == by_image[None]
            assert kh.run_ok(kc, sl) == "False\n"
        finally:
            kh.stop_kernel(km, kc)
    finally:
        assert capsem("pool", "stop").returncode == 0
    kh.wait_gone(timeout=60)
