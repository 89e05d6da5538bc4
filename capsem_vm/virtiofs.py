"""One virtiofsd per shared folder.

We create the vhost-user listening socket ourselves and hand it over with --fd, so virtiofsd needs
no lock directory under /run (which an unprivileged user cannot write). virtiofsd runs in its own
mount namespace (`unshare`), where a read-only share is a read-only bind mount: the guest, root in
its VM, cannot remount it writable because enforcement is on the host. When capsem runs as a normal
user, virtiofsd runs in a user namespace mapping guest root to that user (needs Debian's uidmap for
a full map), so files the guest creates appear on the host owned by the user running capsem.
"""

from __future__ import annotations

import os
import socket

from . import helpers
from .config import RuntimePaths, Share
from .errors import MissingHelperError
from .process import ManagedProcess, spawn

# Runs inside the new mount namespace: make the share read-only there, then become virtiofsd.
_RO_WRAPPER = 'mount --bind "$1" "$1" && mount -o remount,bind,ro "$1" && shift && exec "$@"'


def virtiofsd_args(program: helpers.Program, share: Share, fd: int) -> list[str]:
    if program.dialect == "rust":
        return [str(program.path), f"--fd={fd}", f"--shared-dir={share.host_path}", "--cache=auto",
                "--sandbox=namespace"] + (["--readonly"] if share.readonly else [])
    return [str(program.path), f"--fd={fd}", "-o", f"source={share.host_path}", "-o", "cache=auto",
            "-o", "sandbox=namespace", "-o", "no_xattr"]


def namespace_prefix(privileged: bool) -> list[str]:
    unshare = str(helpers.unshare().path)
    if privileged:
        return [unshare, "--mount", "--propagation", "private", "--"]
    if not helpers.newuidmap_available():
        raise MissingHelperError(
            "sharing a folder as a normal user needs newuidmap/newgidmap (Debian package uidmap)"
            " and subordinate ids for your user in /etc/subuid and /etc/subgid",
            helpers.SETUP_HINT)
    return [unshare, "--map-root-user", "--map-auto", "--mount", "--propagation", "private", "--"]


def listening_socket(path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    os.chmod(path, 0o600)
    sock.listen(1)
    return sock


async def start_virtiofsd(share: Share, paths: RuntimePaths) -> ManagedProcess:
    program = helpers.virtiofsd()
    sock = listening_socket(paths.fs_socket(share.tag))
    try:
        fd = sock.fileno()
        argv = namespace_prefix(os.geteuid() == 0)
        inner = virtiofsd_args(program, share, fd)
        if share.readonly and program.dialect == "c":
            argv += ["sh", "-c", _RO_WRAPPER, "sh", str(share.host_path)] + inner
        else:
            argv += inner
        log = open(paths.root / f"virtiofsd-{share.tag}.log", "wb")
        try:
            return await spawn(f"virtiofsd[{share.tag}]", argv, pass_fds=(fd,), stdout=log, stderr=log)
        finally:
            log.close()
    finally:
        sock.close()  # the child holds its own copy
