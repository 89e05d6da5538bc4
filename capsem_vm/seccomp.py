"""Small seccomp-BPF deny filters for the helpers QEMU has not filtered itself.

VIRTIOFSD (RULES, the default) — what the guest must never create on the host.

virtiofsd does, on the host, whatever file operation the guest asks for within the shared folder.
Its own sandbox (namespaces, pivot_root, its own seccomp allow-list) keeps it inside the folder;
this filter, installed before it starts, adds what its options cannot express:

    chmod/fchmod/fchmodat/fchmodat2, open/openat/creat, mkdir/mkdirat  with S_ISUID or S_ISGID
        in the mode                                                      -> EPERM (no set-id files)
    mknod/mknodat, bind                                                 -> EPERM (no device nodes,
                                                                            FIFOs or sockets; virtiofsd
                                                                            gets its socket with --fd)
    symlink/symlinkat, link/linkat                                      -> EPERM (no symlinks that
                                                                            host programs follow, no
                                                                            hard links, not even to
                                                                            a host user's symlink)
    renameat2 with any flag but RENAME_NOREPLACE (RENAME_EXCHANGE,
    RENAME_WHITEOUT)                                                    -> EPERM
    setxattr/lsetxattr/fsetxattr                                        -> EPERM (no ACLs, no file
                                                                            capabilities)
    openat2 (its mode hides behind a pointer), io_uring_* (would bypass
    seccomp), x32 and 32-bit syscalls                                   -> EPERM

With `notify=True` (the share guard, share_guard.py) every remaining call that gives a file a
name or writes one — open/openat with O_CREAT, O_WRONLY, O_RDWR or O_TRUNC, creat, truncate,
mkdir/mkdirat, rename/renameat/renameat2 — is handed to a supervisor in capsem
(SECCOMP_RET_USER_NOTIF) that reads the path and refuses repository names and writes inside
repositories; seccomp alone cannot see path names. Without a listener such calls fail with ENOSYS.

Everything else is allowed (virtiofsd's own filter restricts further).

VHOST-DEVICE-VSOCK (VSOCK_RULES) — what a vsock backend never needs and whoever took it over would
want (the list was checked against `strace -f` of the real binary over a VM's life: boot, exec,
channel traffic, egress streams, shutdown; see tests/security/test_host_hardening.py):

    ptrace, process_vm_readv/writev, pidfd_getfd, kcmp                  -> EPERM (other processes)
    mount, umount2, pivot_root, chroot, move_mount, open_tree, fsopen,
    fsconfig, fsmount, fspick, mount_setattr, unshare, setns, clone with
    a CLONE_NEW* flag                                                   -> EPERM (namespaces, mounts)
    clone3 (its flags hide behind a pointer)                            -> ENOSYS: glibc then falls
                                                                           back to clone, checked above
    bpf, perf_event_open, kexec_load/kexec_file_load, init_module,
    finit_module, delete_module, keyctl/add_key/request_key,
    userfaultfd, io_uring_*, personality, open_by_handle_at,
    name_to_handle_at, setuid/setgid/setreuid/setregid/setresuid/
    setresgid/setfsuid/setfsgid/setgroups/capset, x32 and 32-bit calls -> EPERM
    execve/execveat                                                     -> the exec gate (exec_gate.py):
                                                                           the launch is let through
                                                                           once, every later exec fails
                                                                           (ENOSYS)

A filter that refuses execve cannot be installed before the exec that starts the program, so
exec is a NOTIFY rule: capsem answers the one exec of the launch and then closes the listener,
after which the kernel fails every notified call with ENOSYS, for good (filters cannot be
removed, and the most restrictive answer of stacked filters wins).

Linux x86_64 only.
Installed in a child between fork and exec (see process.py): filters survive exec and can only
be added to, never removed. Run as a script (`python -I seccomp.py [--listener-to FD] [--rules vsock] PROGRAM
ARGS...`) it installs the filter and execs PROGRAM: used where the filter must come after a set-uid
helper (newgidmap, which no_new_privs would disarm) or confine.py's wrapper (unshare, mount,
setpriv) has run. With --listener-to it installs the notifying filter and sends its listener over
the Unix socket FD (then closes both) before exec; --rules vsock picks VSOCK_RULES.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import struct

AUDIT_ARCH_X86_64 = 0xC000003E
X32_SYSCALL_BIT = 0x40000000
SECCOMP_RET_ALLOW = 0x7FFF0000
SECCOMP_RET_ERRNO = 0x00050000
SECCOMP_RET_USER_NOTIF = 0x7FC00000
SETID_BITS = 0o6000
O_CREAT = 0o100
WRITE_OR_CREATE = 0o1 | 0o2 | 0o100 | 0o1000  # O_WRONLY, O_RDWR, O_CREAT, O_TRUNC
RENAME_NOREPLACE = 1

# x86_64 syscall numbers
NR = {
    "open": 2, "bind": 49, "truncate": 76, "rename": 82, "mkdir": 83, "creat": 85, "link": 86, "symlink": 88,
    "chmod": 90, "fchmod": 91, "mknod": 133, "setxattr": 188, "lsetxattr": 189, "fsetxattr": 190, "openat": 257,
    "mkdirat": 258, "mknodat": 259, "renameat": 264, "linkat": 265, "symlinkat": 266, "fchmodat": 268,
    "renameat2": 316, "io_uring_setup": 425, "io_uring_enter": 426, "io_uring_register": 427,
    "openat2": 437, "fchmodat2": 452,
    # the vsock backend's refusals
    "clone": 56, "execve": 59, "ptrace": 101, "setuid": 105, "setgid": 106, "setreuid": 113, "setregid": 114,
    "setgroups": 116, "setresuid": 117, "setresgid": 119, "setfsuid": 122, "setfsgid": 123, "capset": 126,
    "personality": 135, "pivot_root": 155, "chroot": 161, "mount": 165, "umount2": 166, "init_module": 175,
    "delete_module": 176, "kexec_load": 246, "add_key": 248, "request_key": 249, "keyctl": 250,
    "unshare": 272, "perf_event_open": 298, "name_to_handle_at": 303, "open_by_handle_at": 304, "setns": 308,
    "process_vm_readv": 310, "process_vm_writev": 311, "kcmp": 312, "finit_module": 313,
    "kexec_file_load": 320, "bpf": 321, "execveat": 322, "userfaultfd": 323, "open_tree": 428,
    "move_mount": 429, "fsopen": 430, "fsconfig": 431, "fsmount": 432, "fspick": 433, "clone3": 435,
    "pidfd_getfd": 438, "mount_setattr": 442,
}
SYSCALL_NAMES = {v: k for k, v in NR.items()}

DENY, NOTIFY, ALLOW = "deny", "notify", "allow"
NOSYS = "nosys"  # ENOSYS: "not implemented", which makes glibc fall back (clone3 -> clone)
# syscall -> (checks in order: (argument index, bits, action when any of the bits is set), action
# otherwise). NOTIFY becomes ALLOW in a filter built without notify (no supervisor).
RULES: dict[str, tuple[tuple[tuple[int, int, str], ...], str]] = {
    "chmod": (((1, SETID_BITS, DENY),), ALLOW), "fchmod": (((1, SETID_BITS, DENY),), ALLOW),
    "fchmodat": (((2, SETID_BITS, DENY),), ALLOW), "fchmodat2": (((2, SETID_BITS, DENY),), ALLOW),
    "open": (((2, SETID_BITS, DENY), (1, WRITE_OR_CREATE, NOTIFY)), ALLOW),
    "openat": (((3, SETID_BITS, DENY), (2, WRITE_OR_CREATE, NOTIFY)), ALLOW),
    "truncate": ((), NOTIFY),
    "creat": (((1, SETID_BITS, DENY),), NOTIFY),
    "mkdir": (((1, SETID_BITS, DENY),), NOTIFY), "mkdirat": (((2, SETID_BITS, DENY),), NOTIFY),
    "rename": ((), NOTIFY), "renameat": ((), NOTIFY),
    "renameat2": (((4, 0xFFFFFFFF & ~RENAME_NOREPLACE, DENY),), NOTIFY),
    "mknod": ((), DENY), "mknodat": ((), DENY), "symlink": ((), DENY), "symlinkat": ((), DENY),
    "link": ((), DENY), "linkat": ((), DENY), "bind": ((), DENY),
    "setxattr": ((), DENY), "lsetxattr": ((), DENY), "fsetxattr": ((), DENY),
    "openat2": ((), DENY), "io_uring_setup": ((), DENY), "io_uring_enter": ((), DENY),
    "io_uring_register": ((), DENY),
}

# CLONE_NEWNS | CLONE_NEWCGROUP | CLONE_NEWUTS | CLONE_NEWIPC | CLONE_NEWUSER | CLONE_NEWPID |
# CLONE_NEWNET (CLONE_NEWTIME, 0x80, is clone3/unshare only: in clone's flags it is the exit signal)
CLONE_NAMESPACES = 0x00020000 | 0x02000000 | 0x04000000 | 0x08000000 | 0x10000000 | 0x20000000 | 0x40000000

VSOCK_RULES: dict[str, tuple[tuple[tuple[int, int, str], ...], str]] = {
    "execve": ((), NOTIFY), "execveat": ((), NOTIFY),
    "clone": (((0, CLONE_NAMESPACES, DENY),), ALLOW), "clone3": ((), NOSYS),
    **{name: ((), DENY) for name in (
        "ptrace", "process_vm_readv", "process_vm_writev", "pidfd_getfd", "kcmp",
        "mount", "umount2", "pivot_root", "chroot", "move_mount", "open_tree", "fsopen", "fsconfig", "fsmount",
        "fspick", "mount_setattr", "unshare", "setns",
        "bpf", "perf_event_open", "kexec_load", "kexec_file_load", "init_module", "finit_module", "delete_module",
        "keyctl", "add_key", "request_key", "userfaultfd", "io_uring_setup", "io_uring_enter",
        "io_uring_register", "personality", "name_to_handle_at", "open_by_handle_at",
        "setuid", "setgid", "setreuid", "setregid", "setresuid", "setresgid", "setfsuid", "setfsgid",
        "setgroups", "capset")},
}
RULE_SETS = {"virtiofsd": RULES, "vsock": VSOCK_RULES}

# classic BPF opcodes
_LD_W_ABS = 0x20
_JEQ_K = 0x15
_JGE_K = 0x35
_JSET_K = 0x45
_RET_K = 0x06


def _arg_low(i: int) -> int:
    """Offset of the low 32 bits of syscall argument i in struct seccomp_data (little-endian)."""
    return 16 + 8 * i


def build_filter(rules=RULES, err: int = errno.EPERM, notify: bool = False) -> bytes:
    """The BPF program as packed struct sock_filter entries."""
    ret = {DENY: SECCOMP_RET_ERRNO | err, ALLOW: SECCOMP_RET_ALLOW,
           NOTIFY: SECCOMP_RET_USER_NOTIF if notify else SECCOMP_RET_ALLOW}
    if any(NOSYS in (otherwise, *(c[2] for c in checks)) for checks, otherwise in rules.values()):
        ret[NOSYS] = SECCOMP_RET_ERRNO | errno.ENOSYS  # only when used: other programs stay as they were
    prog: list[tuple[int, object, object, int]] = []  # (code, jt label, jf label, k)

    def op(code, k=0, jt=0, jf=0):
        prog.append((code, jt, jf, k))

    op(_LD_W_ABS, 4)                                   # arch
    op(_JEQ_K, AUDIT_ARCH_X86_64, 0, DENY)
    op(_LD_W_ABS, 0)                                   # syscall number
    op(_JGE_K, X32_SYSCALL_BIT, DENY, 0)
    for name in rules:
        op(_JEQ_K, NR[name], f"rule:{name}", 0)
    op(_RET_K, SECCOMP_RET_ALLOW)
    labels: dict[str, int] = {}
    for name, (checks, otherwise) in rules.items():
        labels[f"rule:{name}"] = len(prog)
        for arg, bits, action in checks:
            op(_LD_W_ABS, _arg_low(arg))
            op(_JSET_K, bits, action, 0)
        op(_JEQ_K, 0, otherwise, otherwise)            # an unconditional jump to a shared return
    for action, value in ret.items():
        labels[action] = len(prog)
        op(_RET_K, value)

    out = bytearray()
    for pc, (code, jt, jf, k) in enumerate(prog):
        def rel(target):
            if isinstance(target, str):
                off = labels[target] - pc - 1
                if not 0 <= off <= 255:
                    raise ValueError("seccomp jump out of range")
                return off
            return target
        out += struct.pack("=HBBI", code, rel(jt), rel(jf), k)
    return bytes(out)


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


_PR_SET_NO_NEW_PRIVS = 38
_PR_SET_SECCOMP = 22
_SECCOMP_MODE_FILTER = 2
_NR_SECCOMP = 317
_SECCOMP_SET_MODE_FILTER = 1
_SECCOMP_FILTER_FLAG_NEW_LISTENER = 1 << 3
_SOL_SOCKET = 1
_SCM_RIGHTS = 1


class _Iovec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]


class _Msghdr(ctypes.Structure):
    _fields_ = [("name", ctypes.c_void_p), ("namelen", ctypes.c_uint32), ("iov", ctypes.POINTER(_Iovec)),
                ("iovlen", ctypes.c_size_t), ("control", ctypes.c_void_p), ("controllen", ctypes.c_size_t),
                ("flags", ctypes.c_int)]


class Filter:
    """A filter prepared in the parent (no allocation needed in the forked child).

    `listener_to`: a Unix socket fd. The filter is then the guarded one (name-creating calls go
    to a supervisor): install() asks the kernel for its listener fd, sends it over that socket
    with SCM_RIGHTS and closes both, so that the listener never stays open in the confined
    program. A failure at any step raises: the caller must not exec unguarded.
    """

    def __init__(self, program: bytes | None = None, listener_to: int | None = None, rules=RULES):
        if platform.machine() not in ("x86_64", "AMD64"):
            raise OSError("the helpers' seccomp filters are built for x86_64 only")
        self.listener_to = listener_to
        self.program = program if program is not None else build_filter(rules, notify=listener_to is not None)
        self._buf = ctypes.create_string_buffer(self.program, len(self.program))
        self._fprog = _SockFprog(len(self.program) // 8, ctypes.cast(self._buf, ctypes.c_void_p))
        self._libc = ctypes.CDLL(None, use_errno=True)
        self._libc.syscall.restype = ctypes.c_long
        # the SCM_RIGHTS message, built here; install() only writes the fd number into it
        self._byte = ctypes.create_string_buffer(b"L", 1)
        self._iov = _Iovec(ctypes.cast(self._byte, ctypes.c_void_p), 1)
        self._cmsg = ctypes.create_string_buffer(struct.pack("=QiiI4x", 20, _SOL_SOCKET, _SCM_RIGHTS, 0), 24)
        self._msg = _Msghdr(None, 0, ctypes.pointer(self._iov), 1, ctypes.cast(self._cmsg, ctypes.c_void_p), 24, 0)

    def install(self) -> None:
        """Install in the calling process (sets no_new_privs first). Raises OSError."""
        if self._libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
            e = ctypes.get_errno()
            raise OSError(e, "prctl(PR_SET_NO_NEW_PRIVS)")
        if self.listener_to is None:
            if self._libc.prctl(_PR_SET_SECCOMP, _SECCOMP_MODE_FILTER, ctypes.byref(self._fprog), 0, 0) != 0:
                e = ctypes.get_errno()
                raise OSError(e, "prctl(PR_SET_SECCOMP)")
            return
        listener = self._libc.syscall(_NR_SECCOMP, _SECCOMP_SET_MODE_FILTER, _SECCOMP_FILTER_FLAG_NEW_LISTENER,
                                      ctypes.byref(self._fprog))
        if listener < 0:
            e = ctypes.get_errno()
            raise OSError(e, "seccomp(SECCOMP_FILTER_FLAG_NEW_LISTENER)")
        struct.pack_into("=i", self._cmsg, 16, listener)
        sent = self._libc.sendmsg(self.listener_to, ctypes.byref(self._msg), 0)
        e = ctypes.get_errno()
        os.close(listener)
        os.close(self.listener_to)
        if sent != 1:
            raise OSError(e, "sending the seccomp listener to the share guard")


def _exec_confined(argv: list[str]) -> None:
    import sys
    listener_to, rules = None, RULES
    if argv[:1] == ["--listener-to"] and len(argv) > 1 and argv[1].isdigit():
        listener_to, argv = int(argv[1]), argv[2:]
    if argv[:1] == ["--rules"] and len(argv) > 1 and argv[1] in RULE_SETS:
        rules, argv = RULE_SETS[argv[1]], argv[2:]
    if not argv or argv[0].startswith("--"):
        sys.exit("usage: python -I seccomp.py [--listener-to FD] [--rules virtiofsd|vsock] PROGRAM [ARGS...]")
    Filter(listener_to=listener_to, rules=rules).install()
    os.execvp(argv[0], argv)


if __name__ == "__main__":
    import sys
    _exec_confined(sys.argv[1:])
