"""Host-side, no VM: vhost-device-vsock's seccomp filter (seccomp.VSOCK_RULES) and the exec gate.

A probe launched exactly as vhost_user.py launches the backend (spawn() with the gate's filter)
makes every refused call with arguments the kernel would reject anyway (or that change nothing),
so that without the filter each answer differs from the filter's (EPERM; ENOSYS for exec after the
launch and for clone3) and nothing happens to the host; then does what a vsock backend needs
(threads, fork, Unix sockets with fds, epoll, eventfd, mmap) and must still work. The real binary
then starts under the filter and serves its sockets."""

from __future__ import annotations

import asyncio
import errno
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from capsem_vm import helpers, seccomp
from capsem_vm.errors import MissingHelperError
from capsem_vm.exec_gate import ExecGate
from capsem_vm.process import spawn

NS_FLAGS = {"newns": 0x00020000, "newcgroup": 0x02000000, "newuts": 0x04000000, "newipc": 0x08000000,
            "newuser": 0x10000000, "newpid": 0x20000000, "newnet": 0x40000000}
CLONE_SIGHAND = 0x800  # without CLONE_VM: EINVAL from the kernel, so an unfiltered probe makes no child
NEG = 0xFFFFFFFF  # -1 as a 32-bit argument

# call -> arguments: what the kernel refuses or ignores when no filter is there
REFUSED = {
    "ptrace": (16, 0), "process_vm_readv": (0, 0, 1, 0, 1, 0), "process_vm_writev": (0, 0, 1, 0, 1, 0),
    "pidfd_getfd": (NEG, 0, 0), "kcmp": (0, 0, 0, 0, 0),
    "mount": (0, 0, 0, 0, 0), "umount2": (0, 0), "pivot_root": (0, 0), "chroot": (0,),
    "move_mount": (NEG, 0, NEG, 0, 0), "open_tree": (NEG, 0, 0), "fsopen": (0, 0), "fsconfig": (NEG, 0, 0, 0, 0),
    "fsmount": (NEG, 0, 0), "fspick": (NEG, 0, 0), "mount_setattr": (NEG, 0, 0, 0, 0),
    "unshare": (0,), "setns": (NEG, 0),
    "bpf": (NEG, 0, 0), "perf_event_open": (0, 0, NEG, NEG, 0), "kexec_load": (0, 0, 0, NEG),
    "kexec_file_load": (NEG, NEG, 0, 0, NEG), "init_module": (0, 0, 0), "finit_module": (NEG, 0, 0),
    "delete_module": (0, 0), "keyctl": (NEG,), "add_key": (0, 0, 0, 0, 0), "request_key": (0, 0, 0, 0),
    "userfaultfd": (NEG,), "io_uring_setup": (0, 0), "io_uring_enter": (NEG, 0, 0, 0, 0, 0),
    "io_uring_register": (NEG, 0, 0, 0), "personality": (NEG,), "name_to_handle_at": (NEG, 0, 0, 0, 0),
    "open_by_handle_at": (NEG, 0, 0),
    "setuid": (NEG,), "setgid": (NEG,), "setreuid": (NEG, NEG), "setregid": (NEG, NEG),
    "setresuid": (NEG, NEG, NEG), "setresgid": (NEG, NEG, NEG), "setfsuid": (NEG,), "setfsgid": (NEG,),
    "setgroups": (NEG, 0), "capset": (0, 0),
}
NOT_IMPLEMENTED = {"execve": (0, 0, 0), "execveat": (NEG, 0, 0, 0, 0), "clone3": (0, 0)}

PROBE = r"""
import ctypes, errno, json, mmap, os, select, socket, subprocess, sys, threading
calls = json.loads(sys.argv[1])
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
def call(nr, *args):
    ctypes.set_errno(0)
    r = libc.syscall(ctypes.c_long(nr), *(ctypes.c_long(a) for a in args))
    return "ok" if r != -1 else errno.errorcode.get(ctypes.get_errno(), str(ctypes.get_errno()))
res = {name: call(nr, *args) for name, (nr, args) in calls.items()}
try:
    subprocess.run(["/bin/true"], check=True)
    res["run /bin/true"] = "ok"
except OSError as e:
    res["run /bin/true"] = errno.errorcode.get(e.errno, str(e.errno))
# what a vsock backend does
out = []
t = threading.Thread(target=out.append, args=("thread",)); t.start(); t.join()
res["thread"] = "ok" if out == ["thread"] else "no"
pid = os.fork()
if pid == 0:
    os._exit(7)
res["fork"] = "ok" if os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 7 else "no"
a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
r, w = os.pipe()
socket.send_fds(a, [b"x"], [r])
msg, fds, _, _ = socket.recv_fds(b, 1, 1)
ep = select.epoll(); efd = os.eventfd(0); ep.register(efd, select.EPOLLIN); os.eventfd_write(efd, 1)
m = mmap.mmap(-1, 1 << 20); m[:4] = b"abcd"
res["unix fds epoll eventfd mmap"] = "ok" if msg == b"x" and len(fds) == 1 and ep.poll(1) and m[:4] == b"abcd" else "no"
print(json.dumps(res))
"""


def _calls() -> dict:
    calls = {name: (seccomp.NR[name], args) for name, args in {**REFUSED, **NOT_IMPLEMENTED}.items()}
    for flag, bit in NS_FLAGS.items():
        calls[f"clone {flag}"] = (seccomp.NR["clone"], (bit | CLONE_SIGHAND, 0, 0, 0, 0))
    calls["clone no namespace"] = (seccomp.NR["clone"], (CLONE_SIGHAND, 0, 0, 0, 0))
    calls["x32 getpid"] = (seccomp.X32_SYSCALL_BIT | 39, ())
    return calls


async def test_vsock_filter_refuses_each_class_and_keeps_what_the_backend_needs():
    gate = ExecGate("probe")
    gate.start()
    try:
        proc = await spawn("probe", [sys.executable, "-c", PROBE, json.dumps(_calls())], seccomp=gate.filter,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    finally:
        gate.close_ours()
    await gate.done()
    out, err = await asyncio.get_running_loop().run_in_executor(None, proc.popen.communicate, None, 60)
    await proc.wait()
    res = json.loads(out)
    expected = {name: "EPERM" for name in REFUSED}
    expected.update({name: "ENOSYS" for name in NOT_IMPLEMENTED})
    expected.update({f"clone {flag}": "EPERM" for flag in NS_FLAGS})
    expected.update({"clone no namespace": "EINVAL",  # reaches the kernel (which refuses the flags)
                     "x32 getpid": "EPERM", "run /bin/true": "ENOSYS", "thread": "ok", "fork": "ok",
                     "unix fds epoll eventfd mmap": "ok"})
    assert res == expected, (err.decode(errors="replace"), {k: v for k, v in res.items() if expected.get(k) != v})


def test_vsock_rules_cover_the_issue_list_and_leave_virtiofsd_alone():
    named = set(seccomp.VSOCK_RULES)
    assert {"execve", "execveat", "clone", "clone3"} | set(REFUSED) == named
    assert set(seccomp.RULES).isdisjoint({"execve", "ptrace", "mount", "unshare", "clone"})  # unchanged
    prog = seccomp.build_filter(seccomp.VSOCK_RULES, notify=True)
    assert len(prog) % 8 == 0 and 0 < len(prog) // 8 < 4096


async def test_a_launch_the_gate_does_not_answer_never_runs(tmp_path):
    """Fail closed: the listener is received and closed unanswered (capsem died, the gate timed
    out) -> the program's exec fails (ENOSYS): it never runs unfiltered. And a gate that gets no
    listener at all reports it."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    filt = seccomp.Filter(listener_to=theirs.fileno(), rules=seccomp.VSOCK_RULES)

    def receive_and_drop():
        _, fds, _, _ = socket.recv_fds(ours, 1, 1)
        for fd in fds:
            os.close(fd)  # no answer
        return len(fds)

    loop = asyncio.get_running_loop()
    received = loop.run_in_executor(None, receive_and_drop)
    marker = tmp_path / "ran"
    with pytest.raises(OSError) as exc:
        await spawn("probe", ["/usr/bin/touch", str(marker)], seccomp=filt)
    theirs.close()
    assert await received == 1 and exc.value.errno == errno.ENOSYS and not marker.exists()
    ours.close()

    gate = ExecGate("probe", timeout=0.2)
    gate.start()
    gate.close_ours()  # no child ever sends a listener
    with pytest.raises(OSError, match="no seccomp listener"):
        await gate.done()


async def test_the_real_backend_runs_under_its_filter(tmp_path):
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
        status = dict(line.split(":", 1) for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines())
        assert status["Seccomp"].strip() == "2" and status["NoNewPrivs"].strip() == "1"
    finally:
        await proc.stop(2)
