"""A small seccomp-BPF deny filter for virtiofsd: what the guest must never create on the host.

virtiofsd does, on the host, whatever file operation the guest asks for within the shared folder.
Its own sandbox (namespaces, pivot_root, its own seccomp allow-list) keeps it inside the folder;
this filter, installed before it starts, adds what its options cannot express:

    chmod/fchmod/fchmodat/fchmodat2, open/openat/creat, mkdir/mkdirat  with S_ISUID or S_ISGID
        in the mode                                                      -> EPERM (no set-id files)
    mknod/mknodat                                                       -> EPERM (no device nodes,
                                                                            FIFOs or sockets)
    symlink/symlinkat                                                   -> EPERM (no symlinks that
                                                                            host programs follow)
    setxattr/lsetxattr/fsetxattr                                        -> EPERM (no ACLs, no file
                                                                            capabilities)
    openat2 (its mode hides behind a pointer), io_uring_* (would bypass
    seccomp), x32 and 32-bit syscalls                                   -> EPERM

Everything else is allowed (virtiofsd's own filter restricts further). Linux x86_64 only.
Installed in a child between fork and exec (see process.py): filters survive exec and can only
be added to, never removed. Run as a script (`python -I seccomp.py PROGRAM ARGS...`) it installs
the filter and execs PROGRAM: used where the filter must come after a set-uid helper (newgidmap,
which no_new_privs would disarm) has run.
"""

from __future__ import annotations

import ctypes
import errno
import platform
import struct

AUDIT_ARCH_X86_64 = 0xC000003E
X32_SYSCALL_BIT = 0x40000000
SECCOMP_RET_ALLOW = 0x7FFF0000
SECCOMP_RET_ERRNO = 0x00050000
SETID_BITS = 0o6000

# x86_64 syscall numbers
NR = {
    "open": 2, "chmod": 90, "fchmod": 91, "creat": 85, "mkdir": 83, "mknod": 133,
    "symlink": 88, "setxattr": 188, "lsetxattr": 189, "fsetxattr": 190, "openat": 257,
    "mkdirat": 258, "mknodat": 259, "symlinkat": 266, "fchmodat": 268, "io_uring_setup": 425,
    "io_uring_enter": 426, "io_uring_register": 427, "openat2": 437, "fchmodat2": 452,
}

# syscall -> index of its mode argument (set-id bits refused); None: always refused
RULES: dict[str, int | None] = {
    "chmod": 1, "fchmod": 1, "fchmodat": 2, "fchmodat2": 2,
    "open": 2, "openat": 3, "creat": 1, "mkdir": 1, "mkdirat": 2,
    "mknod": None, "mknodat": None, "symlink": None, "symlinkat": None,
    "setxattr": None, "lsetxattr": None, "fsetxattr": None,
    "openat2": None, "io_uring_setup": None, "io_uring_enter": None, "io_uring_register": None,
}

# classic BPF opcodes
_LD_W_ABS = 0x20
_JEQ_K = 0x15
_JGE_K = 0x35
_JSET_K = 0x45
_RET_K = 0x06


def _arg_low(i: int) -> int:
    """Offset of the low 32 bits of syscall argument i in struct seccomp_data (little-endian)."""
    return 16 + 8 * i


def build_filter(rules: dict[str, int | None] = RULES, err: int = errno.EPERM) -> bytes:
    """The BPF program as packed struct sock_filter entries."""
    deny = SECCOMP_RET_ERRNO | err
    prog: list[tuple[int, object, object, int]] = []  # (code, jt label, jf label, k)

    def op(code, k=0, jt=0, jf=0):
        prog.append((code, jt, jf, k))

    op(_LD_W_ABS, 4)                                   # arch
    op(_JEQ_K, AUDIT_ARCH_X86_64, 0, "deny")
    op(_LD_W_ABS, 0)                                   # syscall number
    op(_JGE_K, X32_SYSCALL_BIT, "deny", 0)
    for name in rules:
        op(_JEQ_K, NR[name], f"rule:{name}", 0)
    op(_RET_K, SECCOMP_RET_ALLOW)
    labels: dict[str, int] = {}
    for name, arg in rules.items():
        labels[f"rule:{name}"] = len(prog)
        if arg is None:
            op(_RET_K, deny)
        else:
            op(_LD_W_ABS, _arg_low(arg))
            op(_JSET_K, SETID_BITS, "deny", "allow")
    labels["allow"] = len(prog)
    op(_RET_K, SECCOMP_RET_ALLOW)
    labels["deny"] = len(prog)
    op(_RET_K, deny)

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


class Filter:
    """A filter prepared in the parent (no allocation needed in the forked child)."""

    def __init__(self, program: bytes | None = None):
        if platform.machine() not in ("x86_64", "AMD64"):
            raise OSError("the virtiofsd seccomp filter is built for x86_64 only")
        self.program = program if program is not None else build_filter()
        self._buf = ctypes.create_string_buffer(self.program, len(self.program))
        self._fprog = _SockFprog(len(self.program) // 8, ctypes.cast(self._buf, ctypes.c_void_p))
        self._libc = ctypes.CDLL(None, use_errno=True)

    def install(self) -> None:
        """Install in the calling process (sets no_new_privs first). Raises OSError."""
        if self._libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
            e = ctypes.get_errno()
            raise OSError(e, "prctl(PR_SET_NO_NEW_PRIVS)")
        if self._libc.prctl(_PR_SET_SECCOMP, _SECCOMP_MODE_FILTER, ctypes.byref(self._fprog), 0, 0) != 0:
            e = ctypes.get_errno()
            raise OSError(e, "prctl(PR_SET_SECCOMP)")


def _exec_confined(argv: list[str]) -> None:
    import os
    import sys
    if not argv:
        sys.exit("usage: python -I seccomp.py PROGRAM [ARGS...]")
    Filter().install()
    os.execvp(argv[0], argv)


if __name__ == "__main__":
    import sys
    _exec_confined(sys.argv[1:])
