"""Pure logic of the VM runner: command line, accelerator choice, config, runtime dirs."""

import asyncio
import os
import subprocess
import sys
import time

import pytest

from capsem_vm import accel, qemu, runtime
from capsem_vm.config import RuntimePaths, Share, VMConfig
from capsem_vm.errors import MissingHelperError
from capsem_vm.process import spawn


def _cmd(config=VMConfig(), accel_name="tcg", tmp="/run/x"):
    assets = qemu.BootAssets("/dev/fd/5", "/dev/fd/6", "/dev/fd/7")
    return qemu.build_command("qemu", config, accel_name, RuntimePaths(__import__("pathlib").Path(tmp)),
                              assets, ["-device", "vsockdev"])


def test_command_has_no_network_and_shared_memory():
    cmd = _cmd()
    joined = " ".join(cmd)
    assert "-nodefaults" in cmd
    assert "-netdev" not in cmd and "-nic" not in cmd and "-net" not in cmd
    assert "memory-backend-memfd,id=mem,size=1024M,share=on" in joined
    assert "-accel tcg,tb-size=" in joined and "-cpu max" in joined
    assert "file=/dev/fd/7,if=none,id=rootfs,format=raw,readonly=on" in joined
    assert "-sandbox" in cmd and cmd[cmd.index("-sandbox") + 1].startswith("on,")
    assert cmd[cmd.index("-kernel") + 1] == "/dev/fd/5"
    assert "vsockdev" in cmd


def test_command_kvm_uses_host_cpu_and_shares_get_devices(tmp_path):
    config = VMConfig(memory_mb=2048, cpus=1, shares=(Share(tmp_path, "nb"),))
    cmd = _cmd(config, "kvm")
    joined = " ".join(cmd)
    assert cmd[cmd.index("-accel") + 1] == "kvm" and "-cpu host" in joined
    assert "size=2048M" in joined and cmd[cmd.index("-smp") + 1] == "1"
    assert "vhost-user-fs-pci,chardev=fs-nb,tag=nb" in joined


def test_kernel_command_line_per_accelerator():
    tcg = _cmd(VMConfig(kernel_args=("capsem.debug",)), "tcg")
    kvm = _cmd(VMConfig(), "kvm")
    tcg_args = tcg[tcg.index("-append") + 1].split()
    kvm_args = kvm[kvm.index("-append") + 1].split()
    for args in (tcg_args, kvm_args):
        assert {"console=ttyS0", "panic=-1", "quiet", "cryptomgr.notests", "capsem.overlay_mb=512"} <= set(args)
    # TCG's TSC is one clock for all vCPUs: keep the guest off the (emulated MMIO) HPET
    assert "tsc=reliable" in tcg_args and "tsc=reliable" not in kvm_args
    assert tcg_args[-1] == "capsem.debug"  # the config's own arguments come last


@pytest.mark.parametrize("kwargs", [{"memory_mb": 10}, {"cpus": 0}, {"cpus": 1000}])
def test_config_rejects_bad_values(kwargs):
    with pytest.raises(ValueError):
        VMConfig(**kwargs)


def test_config_rejects_duplicate_share_tags(tmp_path):
    with pytest.raises(ValueError):
        VMConfig(shares=(Share(tmp_path, "a"), Share(tmp_path / "b", "a")))


def test_accel_choice():
    assert accel.choose("tcg").accel == "tcg"
    usable, _why = accel.kvm_status()
    auto = accel.choose("auto")
    assert auto.accel == ("kvm" if usable else "tcg")
    if os.path.exists("/sys/module/kvm_pvm"):
        assert not usable and "kvm_pvm" in auto.reason
    with pytest.raises(ValueError):
        accel.choose("hvf")


def test_missing_helper_is_a_clear_error(monkeypatch):
    from capsem_vm import helpers
    helpers.qemu.cache_clear()
    monkeypatch.setenv("CAPSEM_QEMU", "/nonexistent/qemu")
    try:
        with pytest.raises(MissingHelperError) as err:
            helpers.qemu()
        assert "qemu-system-x86" in str(err.value) and "make system" in str(err.value)
    finally:
        helpers.qemu.cache_clear()


@pytest.mark.parametrize("finder,env_var,package", [
    ("qemu", "CAPSEM_QEMU", "qemu-system-x86"), ("virtiofsd", "CAPSEM_VIRTIOFSD", "virtiofsd"),
    ("vhost_device_vsock", "CAPSEM_VHOST_DEVICE_VSOCK", "vhost-device-vsock"),
    ("unshare", "CAPSEM_UNSHARE", "util-linux"), ("setpriv", "CAPSEM_SETPRIV", "util-linux")])
def test_each_helper_is_found_through_its_override_or_named_when_missing(monkeypatch, tmp_path, finder, env_var,
                                                                         package):
    from capsem_vm import helpers
    find = getattr(helpers, finder)
    program = tmp_path / "prog"
    program.write_bytes(b"#!/bin/sh\n# source=PATH\n")  # (virtiofsd: read as the C dialect)
    try:
        for mode, found in ((0o644, False), (0o755, True)):
            program.chmod(mode)
            find.cache_clear()
            monkeypatch.setenv(env_var, str(program))
            if found:
                assert find().path == program
            else:
                with pytest.raises(MissingHelperError) as err:
                    find()
                assert package in str(err.value) and "make system" in str(err.value)
    finally:
        find.cache_clear()


def test_sweep_removes_dirs_of_dead_owners_and_kills_their_helpers(tmp_path, monkeypatch):
    monkeypatch.setenv("CAPSEM_RUNTIME_DIR", str(tmp_path / "rt"))
    # A dead owner: a process that has exited.
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    helper = subprocess.Popen(["sleep", "300"])
    rp = runtime.create_vm_dir()
    rp.owner.write_text(f"{dead.pid} {runtime._start_time(os.getpid())}\n")
    runtime.record_pids(rp, [helper])
    live = runtime.create_vm_dir()  # owned by us: must survive
    assert runtime.sweep_stale() == 1
    assert not rp.root.exists() and live.root.exists()
    assert helper.wait(timeout=10) == -9


async def test_spawned_helpers_die_with_their_owner(tmp_path):
    # An owner process spawns a helper through capsem's spawner, then is SIGKILLed.
    script = (
        "import asyncio, sys\n"
        "from capsem_vm.process import spawn\n"
        "async def main():\n"
        "    p = await spawn('sleeper', ['sleep', '300'])\n"
        "    print(p.pid, flush=True)\n"
        "    await asyncio.sleep(300)\n"
        "asyncio.run(main())\n"
    )
    owner = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    helper_pid = int(owner.stdout.readline())
    assert os.path.exists(f"/proc/{helper_pid}")
    owner.kill()
    owner.wait()
    deadline = time.monotonic() + 10
    while os.path.exists(f"/proc/{helper_pid}") and _state(helper_pid) != "Z":
        assert time.monotonic() < deadline, "helper outlived its owner"
        await asyncio.sleep(0.05)


def _state(pid):
    try:
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "gone"


async def test_managed_process_stop_escalates_to_sigkill():
    p = await spawn("stubborn", ["sh", "-c", "trap '' TERM; sleep 300"])
    await asyncio.sleep(0.2)
    t = time.monotonic()
    code = await p.stop(grace=0.5)
    assert code == -9 and time.monotonic() - t < 5


def test_subordinate_gid_is_read_by_name_or_uid_and_bad_lines_are_ignored(tmp_path):
    from capsem_vm.virtiofs import subordinate_gid
    subgid = tmp_path / "subgid"
    subgid.write_text("other:200000:65536\nbroken line\nalice:x:65536\nalice:300000:0\n"
                      "1234:400000:65536\nalice:500000:65536\n")
    assert subordinate_gid("alice", 1000, str(subgid)) == 500000
    assert subordinate_gid("bob", 1234, str(subgid)) == 400000
    assert subordinate_gid("carol", 99, str(subgid)) is None
    assert subordinate_gid("alice", 1000, str(tmp_path / "missing")) is None


def test_virtiofsd_dialect_is_read_from_the_binary(tmp_path, monkeypatch):
    from capsem_vm import helpers
    c_like = tmp_path / "c"
    c_like.write_bytes(b"\x7fELF...    -o source=PATH             shared directory tree\n")
    rust_like = tmp_path / "rust"
    rust_like.write_bytes(b"\x7fELF...--shared-dir <SHARED_DIR>...")
    neither = tmp_path / "neither"
    neither.write_bytes(b"\x7fELF...")
    assert helpers._virtiofsd_dialect(c_like) == "c"
    assert helpers._virtiofsd_dialect(rust_like) == "rust"
    with pytest.raises(MissingHelperError, match="neither the C nor the Rust"):
        helpers._virtiofsd_dialect(neither)


async def test_fd_readable_waits_for_data_or_exit_and_leaves_no_reader():
    """capsem_agent.fdwait.readable (guest procs.wait_exit, host seqpacket and ManagedProcess.wait)."""
    import socket
    from capsem_agent.fdwait import readable
    a, b = socket.socketpair()
    with a, b:
        waiting = asyncio.ensure_future(readable(a.fileno()))
        await asyncio.sleep(0.05)
        assert not waiting.done()
        b.send(b"x")
        await asyncio.wait_for(waiting, 5)
        await asyncio.wait_for(readable(a.fileno()), 5)  # its reader was removed: waiting again works
        a.recv(1)
        cancelled = asyncio.ensure_future(readable(a.fileno()))
        await asyncio.sleep(0.01)
        cancelled.cancel()
        await asyncio.gather(cancelled, return_exceptions=True)
        assert not asyncio.get_running_loop().remove_reader(a.fileno())  # none left behind
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(0.2)"])
    pidfd = os.pidfd_open(child.pid)
    try:
        t = time.monotonic()
        await asyncio.wait_for(readable(pidfd), 10)
        assert child.wait(timeout=1) == 0 and time.monotonic() - t >= 0.1
    finally:
        os.close(pidfd)


def test_kill_if_same_kills_only_the_recorded_process():
    # The sweep signals through a pidfd opened before the start-time check: a live process with the
    # recorded start time dies; a wrong start time (the pid reused by another process), an empty
    # one, or a pid that is gone leaves everything alone.
    proc = subprocess.Popen(["sleep", "300"])
    try:
        start = runtime._start_time(proc.pid)
        assert start
        assert runtime.kill_if_same(proc.pid, str(int(start) + 1)) is False
        assert runtime.kill_if_same(proc.pid, "") is False
        assert proc.poll() is None
        assert runtime.kill_if_same(proc.pid, start) is True
        assert proc.wait(timeout=10) == -9
        assert runtime.kill_if_same(proc.pid, start) is False  # reaped: gone
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_command_has_free_page_reporting_balloon_and_bounded_tcg_cache():
    """Density (issue 19): the guest returns free RAM through the balloon's free page reporting,
    and TCG's translation cache is bounded (QEMU 7.2's default is 1 GiB)."""
    from capsem_vm.qemu import TCG_TB_SIZE_MB
    for accel in ("tcg", "kvm"):
        cmd = _cmd(VMConfig(), accel)
        devices = [cmd[i + 1] for i, a in enumerate(cmd) if a == "-device"]
        assert devices.count("virtio-balloon-pci,id=balloon,free-page-reporting=on") == 1
        assert not any("deflate-on-oom" in d or "free-page-hint" in d for d in devices)
        assert "page_reporting.page_reporting_order=5" in cmd[cmd.index("-append") + 1].split()
        assert cmd.count("-accel") == 1 and "accel=" not in cmd[cmd.index("-machine") + 1]
    tcg, kvm = _cmd(VMConfig(), "tcg"), _cmd(VMConfig(), "kvm")
    assert tcg[tcg.index("-accel") + 1] == f"tcg,tb-size={TCG_TB_SIZE_MB}" and 16 <= TCG_TB_SIZE_MB <= 256
    assert kvm[kvm.index("-accel") + 1] == "kvm"
