"""Real VMs under QEMU (TCG here): boot, exec, VirtioFS, teardown, tampering, hostile frames."""

import asyncio
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from capsem_vm.config import Share, VMConfig
from capsem_vm.errors import AssetVerificationError, ImageError
from capsem_vm.vm import VM

from host_helpers import CAPSEM, helper_processes

pytestmark = pytest.mark.vm


async def _run(vm, argv, **kw):
    proc = await vm.control.exec(argv, **kw)
    out, err = bytearray(), bytearray()
    async for fd, data in proc.output():
        (err if fd == 2 else out).extend(data)
    return proc.result, bytes(out), bytes(err)


async def test_boot_hello_exec_exit_codes_and_large_output(image_dir, runtime_root):
    async with VM(VMConfig(memory_mb=512, cpus=1)) as vm:
        assert vm.hello["v"] == 1
        boot = vm.hello["boot"]
        assert 0 < boot["kernel_s"] <= boot["agent_s"]
        await vm.control.ping()
        res, out, err = await _run(vm, ["sh", "-c", "echo hi; echo oops >&2; exit 3"])
        assert (res.code, out, err) == (3, b"hi\n", b"oops\n")
        res, out, _ = await _run(vm, ["true"])
        assert res.code == 0 and out == b""
        res, _, _ = await _run(vm, ["sh", "-c", "kill -TERM $$"])
        assert res.signal == signal.SIGTERM and res.shell_code == 128 + signal.SIGTERM
        # 8 MiB of output arrives byte-exact.
        res, out, _ = await _run(vm, ["python3", "-c",
                                      "import sys; sys.stdout.buffer.write(bytes(range(256)) * 32768)"])
        assert res.code == 0 and out == bytes(range(256)) * 32768
        # The guest has no network interface but loopback.
        res, out, _ = await _run(vm, ["ls", "/sys/class/net"])
        assert out.split() == [b"lo"]
    assert not runtime_root.joinpath(vm.paths.root.name).exists()


async def test_virtiofs_both_directions_at_the_same_path(image_dir, runtime_root, tmp_path):
    share = tmp_path / "notebook dir"
    share.mkdir()
    (share / "from_host.txt").write_text("hello guest")
    async with VM(VMConfig(memory_mb=512, cpus=1, shares=(Share(share, "nb"),))) as vm:
        res, out, _ = await _run(vm, ["sh", "-c", "pwd; cat from_host.txt; echo hello host > from_guest.txt"],
                                 cwd=str(share))
        assert res.code == 0, out
        assert out == f"{share}\nhello guest".encode()
        # Visible on the host immediately, owned by the user running capsem.
        made = share / "from_guest.txt"
        assert made.read_text() == "hello host\n"
        assert made.stat().st_uid == os.geteuid()
        (share / "later.txt").write_text("second")
        res, out, _ = await _run(vm, ["cat", str(share / "later.txt")])
        assert out == b"second"


async def test_read_only_share_refuses_writes_even_after_remount(image_dir, runtime_root, tmp_path):
    (tmp_path / "keep.txt").write_text("keep")
    async with VM(VMConfig(memory_mb=512, cpus=1, shares=(Share(tmp_path, "ro", readonly=True),))) as vm:
        script = (f"cd {tmp_path}; cat keep.txt; echo x > new.txt; echo rc=$?; "
                  f"mount -o remount,rw {tmp_path}; echo y > new2.txt; echo rc2=$?; rm -f keep.txt")
        res, out, _ = await _run(vm, ["sh", "-c", script])
        assert b"keep" in out and b"rc=0" not in out and b"rc2=0" not in out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt"]


async def test_five_vms_in_parallel_leave_nothing_behind(image_dir, runtime_root):
    vms = [VM(VMConfig(memory_mb=384, cpus=1)) for _ in range(5)]
    try:
        await asyncio.gather(*(vm.start() for vm in vms))
        results = await asyncio.gather(*(_run(vm, ["echo", str(i)]) for i, vm in enumerate(vms)))
        assert [out for _, out, _ in results] == [f"{i}\n".encode() for i in range(5)]
        assert len(helper_processes(str(runtime_root))) == 10  # QEMU + vsock backend each
    finally:
        await asyncio.gather(*(vm.stop() for vm in vms))
    assert helper_processes(str(runtime_root)) == []
    assert list(runtime_root.iterdir()) == []


def test_sigkill_of_capsem_leaves_no_helpers_behind(image_dir, runtime_root, tmp_path):
    mine = (str(runtime_root), str(tmp_path))  # (a root virtiofsd serves /run/capsem-share/<tmp_path>...)
    env = dict(os.environ, CAPSEM_RUNTIME_DIR=str(runtime_root))
    proc = subprocess.Popen(CAPSEM + ["vm", "run", "--memory", "384", "--cpus", "1", "--share", str(tmp_path),
                                      "--", "sh", "-c", "echo started; sleep 600"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    assert proc.stdout.readline() == b"started\n"
    assert len(helper_processes(*mine)) >= 3  # QEMU, vsock backend, virtiofsd
    proc.kill()
    proc.wait()
    deadline = time.monotonic() + 20
    while helper_processes(*mine):
        assert time.monotonic() < deadline, f"left behind: {helper_processes(*mine)}"
        time.sleep(0.2)
    # The dead owner's runtime dir is swept by the next start.
    from capsem_vm import runtime
    assert runtime.sweep_stale() == 1
    assert list(runtime_root.iterdir()) == []


def test_vm_run_cli_streams_output_and_exit_code(image_dir, runtime_root, tmp_path):
    env = dict(os.environ, CAPSEM_RUNTIME_DIR=str(runtime_root))
    (tmp_path / "data.txt").write_text("42")
    proc = subprocess.run(CAPSEM + ["vm", "run", "-q", "--memory", "384", "--cpus", "1", "--share", str(tmp_path),
                                    "--", "sh", "-c", "cat data.txt; pwd; read x; echo got=$x; exit 7"],
                          input=b"typed\n", capture_output=True, env=env, timeout=300)
    assert proc.returncode == 7, proc.stderr
    assert proc.stdout == f"42{tmp_path}\ngot=typed\n".encode()


def _link_image(src: Path, dst: Path, private: str) -> Path:
    """Hard-link an image (650 MB rootfs) into dst; only `private` gets its own copy to tamper with."""
    dst.mkdir()
    for f in src.resolve().iterdir():
        if f.name == private:
            shutil.copyfile(f, dst / f.name)
        else:
            os.link(f, dst / f.name)
    return dst


@pytest.mark.parametrize("tamper", ["flip", "truncate", "swap", "missing"])
@pytest.mark.parametrize("asset", ["vmlinuz", "initrd.img", "rootfs.erofs"])
async def test_tampered_assets_never_boot(image_dir, runtime_root, tmp_path, asset, tamper):
    image = _link_image(image_dir, tmp_path / "img", asset if tamper in ("flip", "truncate") else "")
    target = image / asset
    touched = [target]
    if tamper == "flip":
        with open(target, "r+b") as f:
            f.seek(target.stat().st_size // 2)
            b = f.read(1)
            f.seek(-1, 1)
            f.write(bytes([b[0] ^ 0x01]))
    elif tamper == "truncate":
        os.truncate(target, target.stat().st_size - 1)
    elif tamper == "swap":
        other = image / ("initrd.img" if asset != "initrd.img" else "vmlinuz")
        tmp = image / "tmp"
        target.rename(tmp)
        other.rename(target)
        tmp.rename(other)
        touched.append(other)
    else:
        target.unlink()
    vm = VM(VMConfig(memory_mb=384, cpus=1, image=str(image)))
    with pytest.raises(ImageError) as err:
        await vm.start()
    message = str(err.value)
    assert any(f.name in message for f in touched)  # names the file
    if tamper != "missing":
        assert isinstance(err.value, AssetVerificationError)
        actual = {hashlib.sha256(f.read_bytes()).hexdigest() for f in touched}
        assert any(h in message for h in actual)  # and its actual hash
    assert vm.qemu is None and helper_processes(str(runtime_root)) == []


async def test_hostile_control_connections_do_not_break_host_or_agent(image_dir, runtime_root):
    """Guest code opens more connections to the host's control port and sends garbage."""
    attack = (
        "import socket, struct\n"
        "for payload in [b'\\xff\\xff\\xff\\xff' + b'x' * 100, struct.pack('>I', 5) + b'{bad', b'garbage' * 1000]:\n"
        "    s = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)\n"
        "    try:\n"
        "        s.settimeout(5); s.connect((2, 5000)); s.sendall(payload); print('sent', s.recv(100))\n"
        "    except OSError as e:\n"
        "        print('refused', type(e).__name__)\n"
        "    finally:\n"
        "        s.close()\n"
    )
    async with VM(VMConfig(memory_mb=512, cpus=1)) as vm:
        res, out, err = await _run(vm, ["python3", "-c", attack])
        assert res.code == 0, err
        assert out.count(b"\n") == 3 and b"sent b'" not in out.replace(b"sent b''", b"")
        # The VM and its control channel are unaffected.
        await vm.control.ping()
        res, out, _ = await _run(vm, ["echo", "still here"])
        assert out == b"still here\n"


async def test_a_guest_that_resets_or_powers_off_is_noticed_through_qemus_event(image_dir, runtime_root):
    """QEMU's SHUTDOWN event (qmp.py, held monitor) reaches the VM's owner with its reason: a
    reset (QEMU runs with -no-reboot: it ends the VM) and a power-off behind the agent's back,
    both by guest root through reboot(2)."""
    reboot = "import ctypes; ctypes.CDLL(None, use_errno=True).reboot({cmd})"
    cases = {"guest-reset": 0x01234567, "guest-shutdown": 0x4321FEDC}  # LINUX_REBOOT_CMD_RESTART, _POWER_OFF
    vms = {reason: VM(VMConfig(memory_mb=384, cpus=1)) for reason in cases}
    seen: dict[str, list[dict]] = {reason: [] for reason in cases}
    try:
        await asyncio.gather(*(vm.start() for vm in vms.values()))
        for reason, vm in vms.items():
            vm.on_event = seen[reason].append
            await vm.control.exec(["python3", "-c", reboot.format(cmd=cases[reason])])
        for reason, vm in vms.items():
            await asyncio.wait_for(vm.qemu.wait(), 60)
            deadline = time.monotonic() + 10
            while vm.shutdown_reason is None and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            assert vm.shutdown_reason == reason
            assert {"t": "vm_shutdown", "event": "SHUTDOWN", "reason": reason} in seen[reason], seen[reason]
    finally:
        await asyncio.gather(*(vm.stop() for vm in vms.values()))
    assert helper_processes(str(runtime_root)) == []
