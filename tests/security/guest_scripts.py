"""Attack programs run inside the guest (python3 -c SCRIPT args...). Each prints one JSON line."""

# Pieces the probe scripts start with (here and in test_share_guard, which runs them on the host).
# TRY: res, and t(key, f) storing "ok" or the errno name f() failed with in res[key].
TRY = r"""
import errno
res = {}
def t(key, f):
    try:
        f(); res[key] = "ok"
    except OSError as e:
        res[key] = errno.errorcode.get(e.errno, str(e.errno))
"""
# SYSCALL: sc(*a), a raw syscall (numbers for x86_64) returning its result or raising OSError(errno).
SYSCALL = r"""
import ctypes, os
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
def sc(*a):
    r = libc.syscall(*a)
    if r < 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
    return r
"""

# Connect to ports argv[2]..argv[3] of CID argv[1] with many connects in flight (a refused vsock
# connect to the host takes the guest's 2 s connect timeout: the backend drops it silently).
PORT_SCAN = r"""
import errno, json, os, resource, select, socket, sys, time
cid = int(sys.argv[1])
ports = list(range(int(sys.argv[2]), int(sys.argv[3]) + 1))
timeout = float(sys.argv[4]) if len(sys.argv) > 4 else 3.0
inflight = int(sys.argv[5]) if len(sys.argv) > 5 else 2000
resource.setrlimit(resource.RLIMIT_NOFILE, (inflight + 256, inflight + 256))
accepted, timed_out, errors = [], [], {}
pending = {}
poller = select.poll()
it = iter(ports)
t_start = time.monotonic()
while True:
    while len(pending) < inflight:
        port = next(it, None)
        if port is None:
            break
        s = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
        s.setblocking(False)
        try:
            s.connect((cid, port))
        except BlockingIOError:
            pending[s.fileno()] = (s, port, time.monotonic())
            poller.register(s, select.POLLOUT)
            continue
        except OSError as e:
            errors[errno.errorcode.get(e.errno, e.errno)] = errors.get(errno.errorcode.get(e.errno, e.errno), 0) + 1
            s.close()
            continue
        accepted.append(port)
        s.close()
    if not pending:
        break
    for fd, _ in poller.poll(100):
        s, port, _t = pending.pop(fd)
        poller.unregister(fd)
        err = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err == 0:
            accepted.append(port)
        else:
            name = errno.errorcode.get(err, err)
            errors[name] = errors.get(name, 0) + 1
        s.close()
    now = time.monotonic()
    for fd, (s, port, t0) in list(pending.items()):
        if now - t0 > timeout:
            timed_out.append(port)
            poller.unregister(fd)
            s.close()
            del pending[fd]
# what an accepted connection gives: data, EOF or nothing
behaviour = {}
for port in accepted:
    s = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
    s.settimeout(30)  # the host answers in milliseconds; a TCG guest on a loaded host may not
    try:
        s.connect((cid, port))
        s.sendall(b"\x00\x00\x00\x05hello")
        data = s.recv(100)
        behaviour[port] = "eof" if data == b"" else "data:" + data[:60].hex()
    except socket.timeout:
        behaviour[port] = "open (no answer)"
    except OSError as e:
        behaviour[port] = errno.errorcode.get(e.errno, str(e.errno))
    finally:
        s.close()
print(json.dumps({"cid": cid, "scanned": len(ports), "accepted": sorted(accepted), "behaviour": behaviour,
                  "timed_out": len(timed_out), "timed_out_sample": timed_out[:10], "errors": errors,
                  "seconds": round(time.monotonic() - t_start, 1)}))
"""

# Where a secret could show up in the guest: every file in the writable and runtime places (the
# read-only system image cannot hold a per-run secret), the share, every process's environment
# and command line, and the kernel command line. Defines find_token(token) -> [places].
FIND_TOKEN = r"""
import os
def find_token(token, extra=()):
    needle = token.encode()
    found = []
    for base in ("/run", "/tmp", "/root", "/etc", "/opt/capsem", "/dev/shm", "/var/tmp", *extra):
        for root, dirs, files in os.walk(base):
            for f in files:
                p = os.path.join(root, f)
                try:
                    with open(p, "rb") as fh:
                        if needle in fh.read(4 << 20):
                            found.append(p)
                except OSError:
                    pass
    for pid in [p for p in os.listdir("/proc") if p.isdigit()] + ["self"]:
        for what in ("environ", "cmdline"):
            try:
                with open(f"/proc/{pid}/{what}", "rb") as fh:
                    if needle in fh.read():
                        found.append(f"/proc/{pid}/{what}")
            except OSError:
                pass
    with open("/proc/cmdline", "rb") as fh:
        if needle in fh.read():
            found.append("/proc/cmdline")
    if needle in "\0".join(f"{k}={v}" for k, v in os.environ.items()).encode():
        found.append("os.environ")
    return found
"""

# Read attempts at host files through and around the share; argv: share, outside dir, token
SHARE_READS = FIND_TOKEN + r"""
import ctypes, errno, json, os, struct, sys
share, outside, token = sys.argv[1], sys.argv[2], sys.argv[3] + sys.argv[4]  # halves: argv is searched too
res = {}
def attempt(name, fn):
    try:
        out = fn()
        res[name] = "ok: " + repr(out)[:200]
    except OSError as e:
        res[name] = errno.errorcode.get(e.errno, str(e.errno))
def read(p):
    with open(p, "rb") as f:
        return f.read(4096)
attempt("dotdot", lambda: read(os.path.join(share, "..", os.path.basename(outside), "secret.txt")))
attempt("absolute", lambda: read(os.path.join(outside, "secret.txt")))
attempt("host shadow", lambda: read("/etc/shadow")[:0])  # the guest's own: fine, not the host's
attempt("symlink to outside", lambda: os.symlink(os.path.join(outside, "secret.txt"), os.path.join(share, "l1")))
attempt("symlink to shadow", lambda: os.symlink("/etc/shadow", os.path.join(share, "l2")))
attempt("hard link in", lambda: os.link("/etc/passwd", os.path.join(share, "pw")))
attempt("hard link of outside", lambda: os.link(os.path.join(outside, "secret.txt"), os.path.join(share, "s")))
fd = os.open(share, os.O_RDONLY | os.O_DIRECTORY)
attempt("openat dotdot", lambda: sorted(os.listdir(os.open("..", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd))))
attempt("proc self root", lambda: read("/proc/self/root" + os.path.join(outside, "secret.txt")))
attempt("proc 1 root", lambda: read("/proc/1/root" + os.path.join(outside, "secret.txt")))
attempt("proc fd dotdot", lambda: sorted(os.listdir(f"/proc/self/fd/{fd}/..")))
libc = ctypes.CDLL(None, use_errno=True)
def handles():
    buf = ctypes.create_string_buffer(8 + 128)
    struct.pack_into("I", buf, 0, 128)
    mnt = ctypes.c_int()
    if libc.name_to_handle_at(-100, share.encode(), buf, ctypes.byref(mnt), 0) != 0:
        raise OSError(ctypes.get_errno(), "name_to_handle_at")
    return "got a handle"
attempt("name_to_handle_at", handles)
def by_handle():
    # a forged handle naming inode 2 (a typical filesystem root) of the share's filesystem
    buf = ctypes.create_string_buffer(struct.pack("Ii", 8, 1) + struct.pack("Q", 2))
    mfd = os.open(share, os.O_RDONLY)
    r = libc.open_by_handle_at(mfd, buf, os.O_RDONLY)
    if r < 0:
        raise OSError(ctypes.get_errno(), "open_by_handle_at")
    return os.read(r, 100)
attempt("open_by_handle_at", by_handle)
def bind_mount():
    os.makedirs(os.path.join(share, "bind"), exist_ok=True)
    if libc.mount(b"/", os.path.join(share, "bind").encode(), None, 4096, None) != 0:  # MS_BIND
        raise OSError(ctypes.get_errno(), "mount")
    n = len(os.listdir(os.path.join(share, "bind")))
    libc.umount2(os.path.join(share, "bind").encode(), 2)
    return n
attempt("bind mount / into share", bind_mount)
attempt("xattrs of share", lambda: os.listxattr(share))
attempt("mountinfo", lambda: [l for l in open("/proc/self/mountinfo").read().splitlines() if "virtiofs" in l])
res["token found"] = find_token(token, (share,))
print(json.dumps(res))
"""

# Write attempts that would plant something dangerous on the host; argv: share
SHARE_WRITES = r"""
import ctypes, errno, json, os, shutil, socket, stat, subprocess, sys
share = sys.argv[1]
res = {}
def attempt(name, fn):
    try:
        fn()
        res[name] = "ok"
    except OSError as e:
        res[name] = errno.errorcode.get(e.errno, str(e.errno))
    except subprocess.CalledProcessError as e:
        res[name] = f"exit {e.returncode}"
j = lambda *p: os.path.join(share, *p)
shutil.copy("/bin/sh", j("sh"))
attempt("chmod u+s", lambda: os.chmod(j("sh"), 0o4755))
attempt("chmod g+s", lambda: os.chmod(j("sh"), 0o2755))
attempt("create setuid", lambda: os.close(os.open(j("suid"), os.O_CREAT | os.O_WRONLY, 0o4755)))
attempt("mkdir setgid", lambda: os.mkdir(j("sgid-dir"), 0o2775))
attempt("cp -p setuid binary", lambda: subprocess.run(["cp", "-p", "/bin/su", j("su")], check=True,
                                                         stderr=subprocess.DEVNULL))
attempt("char device", lambda: os.mknod(j("mem"), 0o666 | stat.S_IFCHR, os.makedev(1, 1)))
attempt("block device", lambda: os.mknod(j("vda"), 0o666 | stat.S_IFBLK, os.makedev(254, 0)))
attempt("fifo", lambda: os.mkfifo(j("fifo")))
def unix_socket():
    s = socket.socket(socket.AF_UNIX)
    s.bind(j("sock"))
attempt("unix socket", unix_socket)
attempt("symlink", lambda: os.symlink("/root/.bashrc", j("analysis.ipynb")))
attempt("chown to uid 1000", lambda: os.chown(j("sh"), 1000, 1000))
attempt("chown to root", lambda: os.chown(j("sh"), 0, 0))
attempt("user xattr", lambda: os.setxattr(j("sh"), "user.evil", b"1"))
attempt("file capability", lambda: os.setxattr(j("sh"), "security.capability",
                                               b"\x01\x00\x00\x02" + b"\xff" * 8 + b"\x00" * 8))
attempt("acl", lambda: os.setxattr(j("sh"), "system.posix_acl_access", b"\x02\x00\x00\x00"))
attempt("plain write", lambda: open(j("ok.txt"), "w").write("fine"))
attempt("git config", lambda: open(j(".git", "config"), "a").write("[core]\n\tfsmonitor = touch /tmp/pwned\n"))
attempt("git hook", lambda: open(j(".git", "hooks", "post-checkout"), "w").write("#!/bin/sh\ntouch /tmp/pwned\n"))
attempt("git dir rename", lambda: os.rename(j(".git"), j("git-moved")))
res["modes"] = {f: oct(os.lstat(j(f)).st_mode) for f in sorted(os.listdir(share))}
print(json.dumps(res))
"""

# Forge frames on the agent's own control connection (pidfd_getfd); argv: stage, out file
FORGE = r"""
import ctypes, json, os, socket, struct, sys, time
stage, out = sys.argv[1], sys.argv[2]
libc = ctypes.CDLL(None, use_errno=True)
def frame(msg):
    body = json.dumps(msg).encode()
    return struct.pack(">I", len(body)) + body
conn, agent = None, None
for pid in [p for p in os.listdir("/proc") if p.isdigit() and p != "1"]:
    try:
        cmd = open(f"/proc/{pid}/cmdline", "rb").read()
    except OSError:
        continue
    if b"capsem-agent" not in cmd:
        continue
    pidfd = os.pidfd_open(int(pid))
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            if not os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:"):
                continue
        except OSError:
            continue
        nfd = libc.syscall(438, pidfd, int(fd), 0)  # pidfd_getfd
        if nfd < 0:
            continue
        s = socket.socket(fileno=nfd)
        try:
            if s.family == socket.AF_VSOCK and s.getpeername() == (2, 5000):
                conn, agent = s, int(pid)
                break
        except OSError:
            pass
        s.close()
    if conn:
        break
result = {"agent_pid": agent, "found": conn is not None}
if conn is not None:
    conn.settimeout(120)  # the agent's socket is non-blocking (asyncio): poll instead of blocking it
if conn is not None and stage == "benign":
    conn.sendall(b"".join(frame(m) for m in [
        {"t": "pong", "id": 987654}, {"t": "exit", "id": 987655, "code": 0, "signal": None},
        {"t": "out", "id": 987656, "fd": 1, "data": "aGk="}, {"t": "hello", "v": 1, "agent": "evil", "boot": {}},
        {"t": "kernel_exit", "pid": 1, "code": 0, "signal": None, "tail": "forged"},
        {"t": "zzz"}, {"t": "error", "code": "forged", "message": "forged"}]))
    result["sent"] = 7
elif conn is not None and stage == "huge-int":
    # JSON that json.loads cannot take: CPython's int-digits limit raises ValueError
    body = b'{"t":"kernel_exit","pid":' + b"9" * 5000 + b',"code":0,"signal":null,"tail":""}'
    conn.sendall(struct.pack(">I", len(body)) + body)
    result["sent"] = 1
elif conn is not None and stage == "truncate-then-garbage":
    conn.sendall(struct.pack(">I", 1 << 20) + b"{" * 10)  # a frame that never ends ...
    result["truncated_at"] = time.time()
    open(out, "w").write(json.dumps(result))
    time.sleep(float(sys.argv[3]))
    conn.sendall(b"x" * (1 << 20))                           # ... until it is garbage
    result["garbage_at"] = time.time()
open(out, "w").write(json.dumps(result))
print(json.dumps(result))
"""

# Plant repositories in the share every way the guest can, for argv[3] seconds; argv: share, host
# marker path (what the planted commands would create on the host), seconds (< 0: only the symlink
# attempts at the end). Prints the outcome of each kind of attempt (the set of results seen) and
# how many rounds ran.
SHARE_PLANTS = SYSCALL + r"""
import ctypes, errno, json, os, shutil, stat, sys, time
share, marker, seconds = sys.argv[1], sys.argv[2], float(sys.argv[3])
res = {}
def t(key, f):  # every result seen (the attempts repeat)
    try:
        f(); got = "ok"
    except OSError as e:
        got = errno.errorcode.get(e.errno, str(e.errno))
    res.setdefault(key, set()).add(got)
CMD = f"touch {marker}"
CONFIG = (f"[core]\n\tbare = false\n\tfsmonitor = {CMD}\n\thooksPath = hooks\n\tpager = {CMD}\n"
          f"\tsshCommand = {CMD}\n[alias]\n\tst = !{CMD}\n[filter \"x\"]\n\tclean = {CMD}\n\tsmudge = {CMD}\n")
def write(path, text):
    with open(path, "w") as f:
        f.write(text)
def gitdir_parts(d, head="HEAD"):
    # what a git directory needs: HEAD, objects/, refs/, config (each step may fail)
    os.makedirs(os.path.join(d, "objects"), exist_ok=True)
    os.makedirs(os.path.join(d, "refs", "heads"), exist_ok=True)
    os.makedirs(os.path.join(d, "hooks"), exist_ok=True)
    write(os.path.join(d, "config"), CONFIG.replace("bare = false", f"bare = false\n\tworktree = {os.path.dirname(d)}"))
    write(os.path.join(d, "hooks", "post-checkout"), f"#!/bin/sh\n{CMD}\n")
    write(os.path.join(d, head), "ref: refs/heads/main\n")
rounds = 0
deadline = time.monotonic() + seconds
while seconds >= 0 and (rounds == 0 or time.monotonic() < deadline) and rounds < 20:
    rounds += 1
    for depth in ("", "a", "a/b/c/d"):
        base = os.path.join(share, f"r{rounds}", depth)
        os.makedirs(base, exist_ok=True)
        j = lambda *p: os.path.join(base, *p)
        bfd = os.open(base, os.O_RDONLY | os.O_DIRECTORY)
        for name in (".git", ".GIT", ".Git.", ".git ", ".g\u200cit", "git~1"):
            t(f"mkdir {name!r} + config", lambda: (os.mkdir(j(name)), gitdir_parts(j(name))))
            t(f"gitdir file {name!r}", lambda: write(j(name), "gitdir: ./prepared\n"))
            t(f"mkdirat {name!r}", lambda: os.mkdir(name, dir_fd=bfd))
        for head in ("HEAD", "head", "Head.", "HEAD "):
            t(f"bare repo with {head!r}", lambda: gitdir_parts(j(f"bare-{head.strip('. ')}"), head))
        # prepare a complete git dir under ordinary names, then give it the name
        prep = j("prepared")
        t("prepared dir (HEAD under another name)", lambda: gitdir_parts(prep, "HEAD.tmp"))
        t("rename HEAD.tmp to HEAD", lambda: os.rename(os.path.join(prep, "HEAD.tmp"), os.path.join(prep, "HEAD")))
        t("rename prepared dir to .git", lambda: os.rename(prep, j(".git")))
        t("renameat2 prepared dir to .GIT noreplace", lambda: sc(316, -100, prep.encode(), -100, j(".GIT").encode(), 1))
        t("rename prepared dir to .git (renameat)", lambda: sc(264, bfd, b"prepared", bfd, b".git"))
        t("exchange prepared dir with .git", lambda: sc(316, -100, prep.encode(), -100, j(".git").encode(), 2))
        write(j("gitfile"), "gitdir: ./prepared\n")
        t("rename gitdir file to .git", lambda: os.rename(j("gitfile"), j(".git")))
        t("hard link gitdir file to .git", lambda: os.link(j("gitfile"), j(".git")))
        t("hard link HEAD.tmp to HEAD", lambda: os.link(os.path.join(prep, "HEAD.tmp"), os.path.join(prep, "HEAD")))
        t("mknod .git", lambda: os.mknod(j(".git"), 0o644 | stat.S_IFREG))
        t("open O_CREAT HEAD", lambda: os.close(os.open(os.path.join(prep, "HEAD"), os.O_CREAT | os.O_WRONLY)))
        t("ordinary file", lambda: write(j("notes.txt"), "fine"))
        t("ordinary dir", lambda: os.makedirs(j("data", "x"), exist_ok=True))
        t("ordinary rename", lambda: os.rename(j("notes.txt"), j("notes2.txt")))
        os.close(bfd)
    # the host's own repositories are read-only (top, nested, a worktree's gitdir file, a bare one)
    for key, path in (("host .git config", ".git/config"), ("host nested .git config", "sub/deep/.git/config"),
                      ("host bare config", "lib.git/config")):
        t(key, lambda: open(os.path.join(share, path), "a").write(CONFIG))
    t("host worktree gitdir file", lambda: write(os.path.join(share, "wt", ".git"), "gitdir: ../r1/prepared\n"))
    # repositories the host made while the VM runs (not read-only mounts: the guard covers them)
    for key, path in (("later .git config", "later/.git/config"), ("later bare config", "later.git/config")):
        t(key, lambda: open(os.path.join(share, path), "a").write(CONFIG))
        t(key + " truncate", lambda: os.truncate(os.path.join(share, path), 0))
    t("later .git new hook", lambda: write(os.path.join(share, "later", ".git", "hooks", "post-checkout"), CMD))
    t("later bare new hook", lambda: write(os.path.join(share, "later.git", "hooks", "post-update"), CMD))
    t("host bare HEAD rename away", lambda: os.rename(os.path.join(share, "lib.git", "HEAD"), os.path.join(share, "h")))
    t("host .git rename away", lambda: os.rename(os.path.join(share, "sub", "deep", ".git"), os.path.join(share, "g")))
# the host user's symlink cannot become a guest file's name
link = os.path.join(share, "host-link")
if os.path.lexists(os.path.join(share, "analysis.ipynb")):
    os.unlink(os.path.join(share, "analysis.ipynb"))
t("hard link to host symlink", lambda: os.link(link, os.path.join(share, "analysis.ipynb"), follow_symlinks=False))
t("rename host symlink", lambda: os.rename(link, os.path.join(share, "analysis.ipynb")))
t("renameat2 noreplace host symlink", lambda: sc(316, -100, link.encode(), -100, os.path.join(share, "analysis.ipynb").encode(), 1))
write(os.path.join(share, "analysis.ipynb"), "{}")
t("exchange host symlink with a file", lambda: sc(316, -100, link.encode(), -100, os.path.join(share, "analysis.ipynb").encode(), 2))
t("symlink", lambda: os.symlink("/etc/passwd", os.path.join(share, "evil-link")))
print(json.dumps({"rounds": rounds, **{k: sorted(v) for k, v in res.items()}}))
"""
