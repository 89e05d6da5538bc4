"""Jupyter run by a normal (non-root) host user: the capsem kernel's files belong to that user.

As root, the test runs the kernel as the user `capsemtest` (created if missing, with subordinate
ids for virtiofsd's user namespace); as a normal user, it runs as the current user.
"""

import json
import os
import pwd
import shutil
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from kernel_helpers import KERNEL, STARTUP_TIMEOUT, wait_gone

pytestmark = [pytest.mark.vm, pytest.mark.timeout(1200)]

USER = "capsemtest"

SCRIPT = textwrap.dedent("""
    import json, os, site, sys
    if %(site_dir)r:  # the venv's interpreter is not reachable by this user: use its packages
        n = len(sys.path)
        site.addsitedir(%(site_dir)r)
        first = [p for p in os.environ.get("PYTHONPATH", "").split(":") if p]  # still first (a worktree's code)
        sys.path[:] = first + [p for p in sys.path[n:] + sys.path[:n] if p not in first]
    from jupyter_client.manager import start_new_kernel
    folder = sys.argv[1]
    km, kc = start_new_kernel(kernel_name=%(kernel)r, startup_timeout=%(timeout)r, cwd=folder)
    try:
        code = (
            "import json, os\\n"
            "open('made_in_guest.txt', 'w').write('guest')\\n"
            "os.mkdir('guest_dir')\\n"
            "open('guest_dir/inner.txt', 'w').write('inner')\\n"
            "st = os.stat('from_host.txt')\\n"
            "print(json.dumps({'cwd': os.getcwd(), 'guest_uid': os.getuid(), 'host_file_owner': st.st_uid,"
            " 'host_file': open('from_host.txt').read()}))\\n")
        out = []
        reply = kc.execute_interactive(code, timeout=120,
                                       output_hook=lambda m: out.append(m["content"].get("text", "")))
        assert reply["content"]["status"] == "ok", reply["content"]
        print("RESULT " + "".join(out).strip(), flush=True)
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)
""")


def ensure_user() -> pwd.struct_passwd:
    try:
        entry = pwd.getpwnam(USER)
    except KeyError:
        subprocess.run(["useradd", "--no-create-home", "--shell", "/usr/sbin/nologin", USER], check=True)
        entry = pwd.getpwnam(USER)
    # virtiofsd maps a full id range into its user namespace: it needs subordinate ids.
    for path, flag in (("/etc/subuid", "--add-subuids"), ("/etc/subgid", "--add-subgids")):
        with open(path) as f:
            if not any(line.startswith(f"{USER}:") for line in f):
                subprocess.run(["usermod", flag, "300000-365535", USER], check=True)
    return entry


def python_for(prefix: list[str]) -> tuple[str, str]:
    """(interpreter, site dir to add): this venv's Python if the user may run it, else the system's
    Python of the same version (e.g. a venv made from a pyenv Python under /root, mode 0700)."""
    probe = prefix + ["env", "-i", f"PATH={os.environ['PATH']}", sys.executable, "-c", "pass"]
    if subprocess.run(probe, capture_output=True, cwd="/").returncode == 0:
        return sys.executable, ""
    system = f"/usr/bin/python{sys.version_info[0]}.{sys.version_info[1]}"
    assert os.access(system, os.X_OK), f"{sys.executable} is not usable by {USER} and there is no {system}"
    import sysconfig
    return system, sysconfig.get_paths()["purelib"]


def test_guest_files_belong_to_the_host_user_running_jupyter(capsem_kernelspecs, tmp_path):
    base = capsem_kernelspecs["base"]  # world-traversable, unlike pytest's tmp_path
    if os.geteuid() == 0:
        assert shutil.which("newuidmap"), "uidmap is not installed (scripts/setup-system.sh installs it)"
        user = ensure_user()
        home = base / "user-home"
        folder = home / "notebooks"
        runtime = home / "rt"
        for d in (home, folder, runtime):
            d.mkdir(mode=0o700)
            os.chown(d, user.pw_uid, user.pw_gid)
        prefix = ["runuser", "-u", USER, "--"]
    else:
        user = pwd.getpwuid(os.geteuid())
        home = tmp_path
        folder = tmp_path / "notebooks"
        folder.mkdir(mode=0o700)
        runtime = tmp_path / "rt"
        runtime.mkdir(mode=0o700)
        prefix = []
    host_file = folder / "from_host.txt"
    host_file.write_text("host")
    if os.geteuid() == 0:
        os.chown(host_file, user.pw_uid, user.pw_gid)
    script = home / "run_kernel.py"
    python, site_dir = python_for(prefix)
    script.write_text(SCRIPT % {"kernel": KERNEL, "timeout": STARTUP_TIMEOUT, "site_dir": site_dir})
    os.chmod(script, 0o644)
    env = {"PATH": os.environ["PATH"], "HOME": str(home), "LANG": "C.UTF-8",
           "JUPYTER_PATH": os.environ["JUPYTER_PATH"], "CAPSEM_RUNTIME_DIR": str(runtime)}
    for key in ("CAPSEM_CACHE_DIR", "CAPSEM_VIRTIOFSD", "PYTHONPATH"):
        if key in os.environ:
            env[key] = os.environ[key]
    seen: dict[str, dict] = {}
    stop = threading.Event()
    watcher = threading.Thread(target=_watch_helpers, args=(str(runtime), str(home), seen, stop), daemon=True)
    watcher.start()
    try:
        proc = subprocess.run(prefix + ["env", "-i"] + [f"{k}={v}" for k, v in env.items()]
                              + [python, str(script), str(folder)],
                              capture_output=True, text=True, timeout=STARTUP_TIMEOUT + 300, cwd=str(home))
    finally:
        stop.set()
        watcher.join()
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    line = next(line for line in proc.stdout.splitlines() if line.startswith("RESULT "))
    result = json.loads(line[len("RESULT "):])
    # In the guest, the kernel is root, and the host user's files look like root's.
    assert result == {"cwd": str(folder), "guest_uid": 0, "host_file_owner": 0, "host_file": "host"}
    # On the host, everything the guest made belongs to the user who ran Jupyter.
    for rel in ("made_in_guest.txt", "guest_dir", "guest_dir/inner.txt"):
        st = (folder / rel).stat()
        assert (st.st_uid, st.st_gid) == (user.pw_uid, user.pw_gid), rel
    assert (folder / "guest_dir" / "inner.txt").read_text() == "inner"
    wait_gone(folder, runtime, timeout=30)
    # QEMU and the vsock backend had no uid of their own: namespaces instead (capsem_vm/confine.py)
    assert set(seen) >= {"qemu-system-x86_64", "vhost-device-vsock"}, seen
    mine = {kind: os.readlink(f"/proc/self/ns/{kind}") for kind in ("user", "pid", "net", "ipc", "mnt")}
    for name, info in seen.items():
        assert info["uid"] == str(user.pw_uid) and info["capeff"] == 0, (name, info)
        # seccomp filters: QEMU's -sandbox; the vsock backend's VSOCK_RULES, installed inside the wrapper
        assert info["seccomp"] == "2", (name, info)
        assert all(info["ns"][kind] != mine[kind] for kind in mine), (name, info)
        assert info["home"] == [] or info["home"] == ["rt"], (name, info)  # the user's home is hidden


def _watch_helpers(marker: str, home: str, seen: dict, stop: threading.Event) -> None:
    """Record, while the kernel runs, the confinement of its QEMU and vhost-device-vsock: uid,
    capabilities, namespaces, and what they see of the user's home (through /proc/PID/root)."""
    while not stop.wait(0.5):
        for entry in Path("/proc").iterdir():
            try:
                argv = (entry / "cmdline").read_bytes().split(b"\0")
                name = os.path.basename(argv[0].decode())
                if name not in ("qemu-system-x86_64", "vhost-device-vsock") or marker.encode() not in b" ".join(argv):
                    continue
                status = dict(line.split(":\t", 1) for line in (entry / "status").read_text().splitlines()
                              if ":\t" in line)
                seen[name] = {"uid": status["Uid"].split()[0], "capeff": int(status["CapEff"], 16),
                              "seccomp": status["Seccomp"].strip(),
                              "ns": {k: os.readlink(entry / "ns" / k) for k in ("user", "pid", "net", "ipc", "mnt")},
                              "home": sorted(os.listdir(f"/proc/{entry.name}/root{home}"))}
            except (OSError, ValueError, KeyError, IndexError):
                continue
