"""A process running many capsem kernels has many descriptors (1,252 measured with 20: bench/many.py).
capsem_vm/fds.py: the soft open-files limit is raised before a kernel starts, and readiness checks
work on descriptor numbers above 1023, where select() raises ValueError: the channel relay's
hang-up check, a claimed VM's QEMU pidfd, the vsock backend's exec gate."""

import asyncio
import os
import resource
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from capsem_kernel.channels import _hung_up
from capsem_vm import fds, helpers
from capsem_vm.errors import MissingHelperError
from capsem_vm.exec_gate import ExecGate
from capsem_vm.process import spawn

HIGH = 1500


@pytest.fixture
def high_fds():
    """Make the next descriptors this process opens number above 1023, like a server with ~20
    kernels; yields dup(fd) -> a copy of fd numbered >= HIGH."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < HIGH + 200:
        pytest.skip(f"hard open-files limit {hard}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, HIGH + 200), hard))
    filler = []
    null = os.open(os.devnull, os.O_RDONLY)
    try:
        while True:  # fill every free number below HIGH, so the next ones are above it
            fd = os.dup(null)
            filler.append(fd)
            if fd >= HIGH:
                break
        os.close(filler.pop())
        yield lambda fd: fcntl_dup_high(fd)
    finally:
        for fd in filler:
            os.close(fd)
        os.close(null)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def fcntl_dup_high(fd: int) -> int:
    import fcntl
    return fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, HIGH)


def test_hang_up_check_works_above_fd_1023(high_fds):
    a, b = socket.socketpair()
    high = socket.socket(fileno=high_fds(a.detach()))
    try:
        assert high.fileno() >= 1024
        assert not _hung_up(high)
        b.send(b"x")
        assert not _hung_up(high)  # bytes waiting are no hang-up
        high.recv(1)
        b.close()
        assert _hung_up(high)
    finally:
        high.close()


def test_readable_on_a_high_pidfd(high_fds):
    child = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    pidfd = high_fds(os.pidfd_open(child.pid))
    try:
        assert pidfd >= 1024 and not fds.readable(pidfd)
        child.stdin.close()
        assert fds.readable(pidfd, timeout=30)  # readable once the child exited
    finally:
        os.close(pidfd)
        child.wait()


async def test_the_exec_gate_lets_the_backend_run_in_a_process_with_many_descriptors(high_fds, tmp_path):
    try:
        program = helpers.vhost_device_vsock()
    except MissingHelperError:
        pytest.skip("vhost-device-vsock is not installed")
    gate = ExecGate("vhost-device-vsock")
    gate.start()
    try:
        proc = await spawn("vhost-device-vsock", ["vhost-device-vsock", "--guest-cid", "3", "--socket",
                                                  str(tmp_path / "b.sock"), "--uds-path", str(tmp_path / "u")],
                           executable=str(program.path), seccomp=gate.filter, stderr=subprocess.PIPE)
    finally:
        gate.close_ours()
    try:
        await gate.done()
        for _ in range(400):
            if (tmp_path / "b.sock").exists():
                break
            await asyncio.sleep(0.025)
        assert proc.alive() and (tmp_path / "b.sock").exists()
    finally:
        await proc.stop(2)


def test_the_soft_limit_is_raised_before_a_kernel_starts(tmp_path):
    """In a process started with the common soft limit of 1024, a capsem kernel's pre_launch raises it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard <= 1024:
        pytest.skip(f"hard open-files limit {hard}")
    code = textwrap.dedent(f"""
        import asyncio, os, resource, sys
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        resource.setrlimit(resource.RLIMIT_NOFILE, (1024, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
        from test_kernel_unit import install, provisioner
        from pathlib import Path
        install(Path({str(tmp_path)!r}))
        p = provisioner(Path({str(tmp_path)!r}), "capsem")
        asyncio.run(p.pre_launch(cwd={str(tmp_path)!r}))
        print(resource.getrlimit(resource.RLIMIT_NOFILE)[0])
        asyncio.run(p.cleanup())
    """)
    (tmp_path / "rt").mkdir(mode=0o700)
    env = {**os.environ, "CAPSEM_RUNTIME_DIR": str(tmp_path / "rt"), "JUPYTER_RUNTIME_DIR": str(tmp_path / "jrt")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    want = fds.SOFT_LIMIT_CAP if hard == resource.RLIM_INFINITY else min(hard, fds.SOFT_LIMIT_CAP)
    assert int(out.stdout.split()[-1]) == want
