"""A normal user's QEMU and vhost-device-vsock are confined by namespaces (issue 15 item 12 d):
the wrapper of capsem_vm/confine.py, run by a real unprivileged account (the machine's uid 1000,
or a uid with no account), spawned through capsem's own spawner. The whole VM as a normal user is
tests/test_kernel_user.py."""

from __future__ import annotations

import json
import os
import pwd
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import pytest

from capsem_vm import confine

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="runs the wrapper as another (normal) user: needs root")
UID = 1000 if any(p.pw_uid == 1000 for p in pwd.getpwall()) else 2091188224 + 4360

OWNER = r"""
import asyncio, json, os, subprocess, sys
from capsem_vm import confine
from capsem_vm.process import spawn
vmdir, other, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3]
PROBE = '''
echo "uid=$(id -u)"; grep -E "^(CapEff|CapPrm|CapBnd|NoNewPrivs)" /proc/self/status
kill -0 %d 2>/dev/null && echo "other=signalled" || echo "other=unreachable"
echo "pids=$(ls /proc | grep -c '^[0-9]')"
echo "home=$(ls -A "$HOME" | tr '\\n' ' ')"
cat "$HOME/secret.txt" 2>/dev/null && echo "secret=read" || echo "secret=hidden"
ls -A /tmp | grep -q marker && echo "tmp=visible" || echo "tmp=hidden"
echo "net=$(tail -n +3 /proc/net/dev | cut -d: -f1 | tr -d ' ' | tr '\\n' ' ')"
echo made > "$PWD/made.txt" && echo "vmdir=$PWD"
umount "$HOME" 2>/dev/null && echo "umount=ok" || echo "umount=refused"
''' % other
async def main():
    if mode == "probe":
        p = await spawn("probe", confine.wrap(["/bin/sh", "-c", PROBE], vmdir), cwd=vmdir,
                        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        out, err = p.popen.communicate(timeout=60)
        print(json.dumps({"out": out.decode(), "err": err.decode(), "rc": p.popen.returncode, "pid": p.pid}))
    else:  # a long-running confined helper; the test kills us
        p = await spawn("sleeper", confine.wrap(["/bin/sleep", "6017"], vmdir), cwd=vmdir)
        print(json.dumps({"pid": p.pid}), flush=True)
        await asyncio.sleep(600)
asyncio.run(main())
"""


@pytest.fixture
def user_home():
    base = Path(tempfile.mkdtemp(prefix="capsem-confine-"))
    os.chmod(base, 0o755)
    home = base / "home"
    vmdir = home / "rt" / "vm-test"  # the runtime dir inside the home: hidden, then put back
    vmdir.mkdir(parents=True)
    (home / "secret.txt").write_text("ssh key")
    for p in (home, home / "rt", vmdir, home / "secret.txt"):
        os.chown(p, UID, UID)
    os.chmod(home / "secret.txt", 0o600)
    marker = Path(tempfile.mkdtemp(prefix="marker-", dir="/tmp"))
    yield home, vmdir
    shutil.rmtree(base)
    shutil.rmtree(marker)


def _as_user(home: Path, *args: str, **kw):
    purelib = sysconfig.get_paths()["purelib"]
    env = {"PATH": "/usr/bin:/bin", "HOME": str(home), "PYTHONPATH": f"{REPO}:{REPO / 'guest-agent'}:{purelib}"}
    python = f"/usr/bin/python{sys.version_info[0]}.{sys.version_info[1]}"
    return subprocess.Popen([python, "-c", OWNER, *args], user=UID, group=UID, extra_groups=[], env=env,
                            cwd=str(home), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def _ns(pid: int | str, kind: str) -> str:
    return os.readlink(f"/proc/{pid}/ns/{kind}")


def test_a_normal_users_helper_sees_no_process_file_or_network_of_the_user(user_home):
    home, vmdir = user_home
    other = subprocess.Popen(["sleep", "600"], user=UID, group=UID, extra_groups=[])  # e.g. their Jupyter
    try:
        proc = _as_user(home, str(vmdir), str(other.pid), "probe")
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        res = json.loads(out)
        lines = dict(line.split("=", 1) for line in res["out"].splitlines() if "=" in line)
        caps = {line.split(":")[0]: int(line.split()[1], 16) for line in res["out"].splitlines() if line.startswith("Cap")}
        assert res["rc"] == 0, res
        assert lines["uid"] == "0" and caps == {"CapEff": 0, "CapPrm": 0, "CapBnd": 0}  # root of nothing
        assert lines["other"] == "unreachable"  # the user's other processes: not even visible
        assert int(lines["pids"]) <= 5  # its own shell and pipeline only
        assert lines["home"].split() == ["rt"] and lines["secret"] == "hidden" and lines["tmp"] == "hidden"
        assert lines["net"].split() == ["lo"]
        assert lines["vmdir"] == str(vmdir) and (vmdir / "made.txt").read_text() == "made\n"
        assert (vmdir / "made.txt").stat().st_uid == UID  # on the host: the user's, as before
        assert lines["umount"] == "refused"  # no capability to undo the hiding
    finally:
        other.kill()
        other.wait()


def test_a_confined_helper_is_in_namespaces_of_its_own_and_dies_with_its_owner(user_home):
    home, vmdir = user_home
    owner = _as_user(home, str(vmdir), "0", "sleep")
    try:
        unshare_pid = json.loads(owner.stdout.readline())["pid"]
        deadline = time.monotonic() + 30
        helper = None
        while helper is None:
            for entry in Path("/proc").iterdir():
                if entry.name.isdigit():
                    try:
                        if (entry / "cmdline").read_bytes() == b"/bin/sleep\x006017\x00":
                            helper = entry.name
                    except OSError:
                        pass
            assert time.monotonic() < deadline, "the confined helper did not start"
            time.sleep(0.05)
        for kind in ("user", "pid", "net", "ipc", "mnt", "uts"):
            assert _ns(helper, kind) != _ns(owner.pid, kind), kind
        status = Path(f"/proc/{helper}/status").read_text()
        assert f"Uid:\t{UID}\t{UID}\t{UID}\t{UID}" in status and "CapEff:\t0000000000000000" in status
        assert Path(f"/proc/{unshare_pid}").exists()
        assert confine.program_pid(unshare_pid) == int(helper)  # (pool status: the real QEMU's memory)
    finally:
        owner.kill()
        owner.wait()
    deadline = time.monotonic() + 10
    while Path(f"/proc/{helper}").exists() and "State:\tZ" not in Path(f"/proc/{helper}/status").read_text():
        assert time.monotonic() < deadline, "the confined helper outlived capsem"
        time.sleep(0.05)
