"""One virtiofsd per shared folder, confined to it.

We create the vhost-user listening socket ourselves and hand it over with --fd, so virtiofsd needs
no lock directory under /run (which an unprivileged user cannot write).

Confinement, outermost first:
- virtiofsd runs as the folder's owner (capsem as root) or as the user running capsem, never as
  root with capabilities: it is started as that user and creates its own user namespace
  (`unshare --map-root-user`) in which only that user exists, as uid 0. Files the guest (root in
  its VM) creates appear on the host owned by that user; a guest asking for any other owner gets
  an error (the id is not mapped). A normal user with supplementary groups needs one more
  mapped group (see `userns_options`).
- a seccomp filter (seccomp.py), installed before exec, refuses set-uid/set-gid modes, device
  nodes, FIFOs, sockets, symlinks and xattrs in the share, whatever virtiofsd is asked to do.
- virtiofsd's own sandbox (`sandbox=namespace`: mount, pid and net namespaces, pivot_root into the
  folder, its own seccomp allow-list), `no_xattr`, and `modcaps=-mknod:-setfcap`.
- the share guard (share_guard.py): virtiofsd's name-creating calls go to a supervisor thread in
  capsem that refuses repository names (`.git`, `HEAD`, `.hg`, any spelling: host git would run
  their configuration) and renames of symlinks.
- a read-only share is a read-only bind mount in virtiofsd's mount namespace: the guest, root in
  its VM, cannot remount it writable because enforcement is on the host. Existing repositories in
  a writable share, at any depth (`.git` directories and gitdir files, `.hg`, directories holding
  a `HEAD`: repo_names.existing_repositories), are made read-only the same way.
- the guest mounts shares nosuid,nodev (capsem_agent.mounts) — a courtesy; the host decides.

Folders that would expose the host are refused: `/`, system directories, home directories (which
hold shell start-up files, SSH keys and capsem's own CA key) and any ancestor of capsem's data,
config, cache or runtime dirs.
"""

from __future__ import annotations

import asyncio
import os
import pwd
import socket
from pathlib import Path

from . import helpers, paths, privsep, repo_names
from .caplog import CappedLog
from .config import RuntimePaths, Share
from .errors import VMError
from .process import Identity, ManagedProcess, spawn
from .share_guard import ShareGuard

# Runs inside the new mount namespace: make the paths given before "--" read-only bind mounts
# there, then become virtiofsd.
_RO_WRAPPER = ('while [ "$1" != "--" ]; do mount --bind "$1" "$1" && mount -o remount,bind,ro "$1" || exit 1; '
               'shift; done; shift; exec "$@"')

SYSTEM_DIRS = ("/", "/bin", "/boot", "/dev", "/etc", "/home", "/lib", "/lib64", "/opt", "/proc", "/root",
               "/run", "/sbin", "/srv", "/sys", "/usr", "/var", "/tmp", "/var/tmp", "/mnt", "/media")


def virtiofsd_args(program: helpers.Program, share: Share, fd: int) -> list[str]:
    if program.dialect == "rust":  # xattrs are off unless --xattr is given
        return [str(program.path), f"--fd={fd}", f"--shared-dir={share.host_path}", "--cache=auto",
                "--sandbox=namespace", "--modcaps=-mknod:-setfcap"] + (["--readonly"] if share.readonly else [])
    return [str(program.path), f"--fd={fd}", "-o", f"source={share.host_path}", "-o", "cache=auto",
            "-o", "sandbox=namespace", "-o", "no_xattr", "-o", "modcaps=-mknod:-setfcap"]


def _homes() -> set[Path]:
    """Home directories of root, of the user running capsem and of every regular account."""
    homes = {Path(v).resolve() for v in (os.environ.get("HOME"), os.path.expanduser("~")) if v and v != "/"}
    for entry in pwd.getpwall():
        if (entry.pw_uid == 0 or entry.pw_uid >= 1000) and entry.pw_dir not in ("", "/", "/nonexistent"):
            homes.add(Path(entry.pw_dir).resolve())
    return homes


def check_share_path(path: os.PathLike | str) -> Path:
    """Refuse folders whose sharing would hand the guest the host. Returns the resolved path."""
    p = Path(path).resolve()
    hint = "share a project folder (for example ~/notebooks/project), not a home or system directory"
    if str(p) in SYSTEM_DIRS:
        raise VMError(f"refusing to share {p} with the VM: it is a system directory", hint)
    for home in _homes():
        if p == home or p in home.parents:
            raise VMError(f"refusing to share {p} with the VM: it is or contains a home directory ({home}: "
                          "shell start-up files, SSH keys and capsem's CA key would be open to the guest)", hint)
    for d in (paths.data_dir(), paths.config_dir(), paths.cache_dir(), paths.system_cache_dir(),
              paths.runtime_dir()):
        d = Path(d).resolve()
        if p == d or p in d.parents or d in p.parents:
            raise VMError(f"refusing to share {p} with the VM: it is or contains capsem's private state ({d})", hint)
    return p


def check_owner_can_reach(path: Path, uid: int, gid: int) -> None:
    """virtiofsd runs as the folder's owner: every directory above the folder must let them pass
    (root's capabilities do not follow it into its user namespace)."""
    if uid == os.geteuid():
        return
    try:
        groups = set(os.getgrouplist(pwd.getpwuid(uid).pw_name, gid))
    except KeyError:
        groups = {gid}
    for d in [path, *path.parents]:
        st = d.stat()
        if st.st_uid == uid:
            ok = st.st_mode & 0o100
        elif st.st_gid in groups:
            ok = st.st_mode & 0o010
        else:
            ok = st.st_mode & 0o001
        if not ok:
            raise VMError(f"the shared folder's owner (uid {uid}) cannot reach {path}: {d} is mode "
                          f"{st.st_mode & 0o7777:04o}, owned by uid {st.st_uid}",
                          "virtiofsd runs as the folder's owner: move the folder, or let its owner "
                          "traverse the directories above it")


def listening_socket(path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    os.chmod(path, 0o600)
    sock.listen(1)
    return sock


def userns_options() -> tuple[list[str], bool]:
    """`unshare` options for virtiofsd's user namespace, and whether the seccomp filter must be
    installed inside it (after unshare) instead of before.

    The C virtiofsd drops supplementary groups with setgroups() and exits when that fails. Root's
    helpers have none (spawn clears them), so `--map-root-user` does. A normal user's process
    keeps its groups, and a namespace whose gid map that user wrote itself forbids setgroups; a
    gid map written by newgidmap allows it, but only when it maps one of the user's subordinate
    gids as well (shadow refuses otherwise). So: the user's own uid/gid as 0, plus their first
    subordinate gid as gid 1 (a gid that user owns anyway). newgidmap is set-uid, which
    no_new_privs (needed by seccomp) would disarm: the filter is then installed after unshare.
    """
    if privsep.privileged() or not os.getgroups():
        return ["--map-root-user"], False
    user = pwd.getpwuid(os.geteuid())
    first = subordinate_gid(user.pw_name, os.geteuid())
    if first is None:
        raise VMError(f"user {user.pw_name} has supplementary groups and no subordinate gid range: "
                      "virtiofsd cannot drop its groups in its user namespace",
                      f"add a range (as root: usermod --add-subgids 100000-165535 {user.pw_name}), "
                      "or run Jupyter without supplementary groups")
    return ["--map-user=0", "--map-group=0", f"--map-groups={first},1,1"], True


def subordinate_gid(name: str, uid: int, path: str = "/etc/subgid") -> int | None:
    """The first gid of `name`'s (or `uid`'s) first range in /etc/subgid, or None."""
    try:
        lines = Path(path).read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        parts = line.strip().split(":")
        if len(parts) == 3 and parts[0] in (name, str(uid)) and parts[1].isdigit() and parts[2].isdigit() \
                and int(parts[2]) > 0:
            return int(parts[1])
    return None


def protected_paths(root: Path) -> list[Path]:
    """What must be read-only in a writable share: the repositories it already holds."""
    try:
        found = repo_names.existing_repositories(root)
    except repo_names.TooManyDirectories as exc:
        raise VMError(f"refusing to share {root} writable: {exc}, too many to check for repositories",
                      "share a smaller folder, or share this one read-only") from None
    if root in found:
        raise VMError(f"refusing to share {root} writable: it holds a HEAD file (it is, or could be made, "
                      "a git repository whose configuration host git would run)", "share it read-only")
    return found


async def start_virtiofsd(share: Share, paths_: RuntimePaths, qemu_identity: Identity | None = None) -> ManagedProcess:
    """Start virtiofsd for `share`. `qemu_identity`: the user QEMU runs as (it must be able to
    connect to the vhost-user socket)."""
    check_share_path(share.host_path)
    program = helpers.virtiofsd()
    uid, gid = privsep.share_owner(share.host_path)
    identity = Identity(uid, gid, ()) if privsep.privileged() else None
    check_owner_can_reach(Path(share.host_path), uid, gid)
    sock = listening_socket(paths_.fs_socket(share.tag))
    if qemu_identity is not None:
        os.chown(paths_.fs_socket(share.tag), qemu_identity.uid, qemu_identity.gid, follow_symlinks=False)
    try:
        fd = sock.fileno()
        map_options, filter_inside = userns_options()
        argv = [str(helpers.unshare().path), *map_options, "--mount", "--propagation", "private", "--"]
        inner = virtiofsd_args(program, share, fd)
        if share.readonly and program.dialect == "c":
            ro = [str(share.host_path)]
        elif not share.readonly:
            ro = [str(p) for p in await asyncio.to_thread(protected_paths, Path(share.host_path))]
        else:
            ro = []
        guard = ShareGuard(share.tag)  # virtiofsd's name-creating calls are checked by this thread
        if filter_inside:
            inner = guard.wrap(inner)
        if ro:
            argv += ["sh", "-c", _RO_WRAPPER, "sh"] + ro + ["--"] + inner
        else:
            argv += inner
        log = CappedLog(paths_.root / f"virtiofsd-{share.tag}.log")
        try:
            proc = await spawn(f"virtiofsd[{share.tag}]", argv, pass_fds=(fd, *guard.pass_fds), stdout=log.fd,
                               stderr=log.fd, identity=identity, seccomp=None if filter_inside else guard.filter)
        except BaseException:
            guard.close()
            raise
        finally:
            log.close_writer()
        try:
            await guard.attach(proc)
        except BaseException:
            guard.close()
            proc.kill_now()
            raise
        proc.guard = guard  # lives as long as virtiofsd (tests reach it here)
        return proc
    finally:
        sock.close()  # the child holds its own copy
