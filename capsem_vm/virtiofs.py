"""One virtiofsd per shared folder, confined to it.

We create the vhost-user listening socket ourselves and hand it over with --fd, so virtiofsd needs
no lock directory under /run (which an unprivileged user cannot write).

Confinement, outermost first:
- virtiofsd never runs as root. capsem as root: it runs as a uid leased for it alone (privsep.py),
  never the folder's owner's, and serves the folder through an idmapped mount made in a private
  mount namespace (idmap_share.py) that maps the folder's owner to that uid: files the guest
  creates belong to the owner (root for a root-owned folder), and the uid owns nothing else on the
  host. capsem as a normal user: it runs as that user. Either way it then creates its own user
  namespace (`unshare --map-root-user`) in which only that uid exists, as uid 0: a guest asking for
  any other owner gets an error (the id is not mapped). A normal user with supplementary groups
  needs one more mapped group (see `userns_options`).
- a seccomp filter (seccomp.py), installed before exec, refuses set-uid/set-gid modes, device
  nodes, FIFOs, sockets, symlinks and xattrs in the share, whatever virtiofsd is asked to do.
- virtiofsd's own sandbox (`sandbox=namespace`: mount, pid and net namespaces, pivot_root into the
  folder, its own seccomp allow-list), `no_xattr`, and `modcaps=-mknod:-setfcap`.
- the share guard (share_guard.py): virtiofsd's name-creating and writing calls go to a supervisor
  thread in capsem that refuses repository names (`.git`, `HEAD`, `.hg`, any spelling: host git
  would run their configuration), writes inside repositories and renames of symlinks.
- a read-only share is a read-only bind mount in virtiofsd's mount namespace: the guest, root in
  its VM, cannot remount it writable because enforcement is on the host. Existing repositories in
  a writable share, at any depth (`.git` directories and gitdir files, `.hg`, directories holding
  a `HEAD`: repo_names.existing_repositories), are made read-only the same way.
- the guest mounts shares nosuid,nodev (capsem_agent.mounts) — a courtesy; the host decides.

Folders that would expose the host are refused: system trees and anything inside them (/etc, /usr,
/bin, /sbin, /lib*, /boot, /root, /proc, /sys, /dev, /var but /var/tmp's subdirectories), `/` and
the shared roots themselves (/tmp, /var/tmp, /home, /mnt, /srv, /opt, /media, /run), home
directories (which hold shell start-up files, SSH keys and capsem's own CA key) and any ancestor of
capsem's data, config, cache or runtime dirs.
"""

from __future__ import annotations

import asyncio
import os
import pwd
import socket
import stat
import sys
from pathlib import Path

from . import helpers, idmap_share, nofollow, paths, privsep, repo_names
from .caplog import CappedLog
from .config import RuntimePaths, Share
from .errors import VMError
from .process import Identity, ManagedProcess, spawn
from .share_guard import ShareGuard

# Runs inside the new mount namespace: make the paths given before "--" read-only bind mounts
# there, then become virtiofsd.
_RO_WRAPPER = ('while [ "$1" != "--" ]; do mount --bind "$1" "$1" && mount -o remount,bind,ro "$1" || exit 1; '
               'shift; done; shift; exec "$@"')

# Refused with everything inside them (matched on the resolved path's first component; /lib* is
# every top-level name starting with "lib"): the host's own software, configuration and state.
SYSTEM_TREES = ("/etc", "/usr", "/bin", "/sbin", "/boot", "/root", "/proc", "/sys", "/dev", "/var")
SYSTEM_TREE_EXCEPTIONS = ("/var/tmp",)  # its subdirectories are users' folders
# Refused themselves only: roots that hold other users' folders (a project folder inside is fine).
SHARED_ROOTS = ("/", "/tmp", "/var/tmp", "/home", "/mnt", "/srv", "/opt", "/media", "/run")
SHARE_MOUNT_BASE = Path(os.environ.get("CAPSEM_SHARE_MOUNT_BASE", "/run/capsem-share"))


def virtiofsd_args(program: helpers.Program, share: Share, fd: int, source: Path | None = None) -> list[str]:
    """`source`: where virtiofsd finds the folder (the idmapped mount for a root capsem)."""
    source = share.host_path if source is None else source
    if program.dialect == "rust":  # xattrs are off unless --xattr is given
        return [str(program.path), f"--fd={fd}", f"--shared-dir={source}", "--cache=auto",
                "--sandbox=namespace", "--modcaps=-mknod:-setfcap"] + (["--readonly"] if share.readonly else [])
    return [str(program.path), f"--fd={fd}", "-o", f"source={source}", "-o", "cache=auto",
            "-o", "sandbox=namespace", "-o", "no_xattr", "-o", "modcaps=-mknod:-setfcap"]


def _homes() -> set[Path]:
    """Home directories of root, of the user running capsem and of every regular account."""
    homes = {Path(v).resolve() for v in (os.environ.get("HOME"), os.path.expanduser("~")) if v and v != "/"}
    for entry in pwd.getpwall():
        if (entry.pw_uid == 0 or entry.pw_uid >= 1000) and entry.pw_dir not in ("", "/", "/nonexistent"):
            homes.add(Path(entry.pw_dir).resolve())
    return homes


def system_tree(p: Path) -> str | None:
    """The system tree (SYSTEM_TREES, /lib*) that the resolved absolute path `p` is or is inside."""
    parts = p.parts
    if len(parts) < 2:
        return None
    top = "/" + parts[1]
    if any(p == Path(e) or Path(e) in p.parents for e in SYSTEM_TREE_EXCEPTIONS):
        return None
    if top in SYSTEM_TREES or parts[1].startswith("lib"):
        return top
    return None


def check_share_path(path: os.PathLike | str) -> Path:
    """Refuse folders whose sharing would hand the guest the host. Returns the resolved path."""
    p = Path(os.path.abspath(path)).resolve()  # symlinks, `..` and trailing slashes resolved first
    hint = "share a project folder (for example ~/notebooks/project), not a home or system directory"
    tree = system_tree(p)
    if tree is not None:
        raise VMError(f"refusing to share {p} with the VM: it is inside the system tree {tree}", hint)
    if str(p) in SHARED_ROOTS:
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


def listening_socket(path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    nofollow.chmod(path, 0o600)
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
    inside = _inside_a_git_directory(root)
    if inside is not None:
        raise VMError(f"refusing to share {root} writable: it is inside {inside}, a repository's own directory "
                      "(hooks and configuration there are run by host git)", "share it read-only")
    return found


def _inside_a_git_directory(root: Path) -> Path | None:
    """The ancestor of `root` that is a repository's own directory (named like .git/.hg, or holding
    a HEAD file), or None. Why: the share guard sees paths from the share's root down only, so a share
    such as repo/.git/hooks would let the guest write the hooks host git runs."""
    for d in root.parents:
        if repo_names.repository_name(d.name) not in (None, repo_names.REPOSITORY_NAMES["head"]):
            return d
        if os.path.isfile(d / "HEAD"):  # a git directory (bare, or a .git by another name)
            return d
    return None


def share_mount_base() -> Path:
    """The empty root-owned 0755 directory over which each root virtiofsd's private mount
    namespace puts a tmpfs holding its idmapped folder (idmap_share.py)."""
    SHARE_MOUNT_BASE.mkdir(mode=0o755, parents=True, exist_ok=True)
    st = SHARE_MOUNT_BASE.lstat()
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != 0 or st.st_mode & 0o022:
        raise VMError(f"{SHARE_MOUNT_BASE} must be a directory owned by root and writable by root only "
                      f"(it is mode {stat.S_IMODE(st.st_mode):04o}, uid {st.st_uid})",
                      "remove it; capsem recreates it")
    return SHARE_MOUNT_BASE


async def _wait_ready(fd: int, what: str, timeout: float = 30.0) -> None:
    """The idmap stage's report: "ok" once virtiofsd is about to start, else why it failed."""
    loop = asyncio.get_running_loop()

    def read_all() -> bytes:
        chunks = []
        while chunk := os.read(fd, 4096):
            chunks.append(chunk)
            if sum(map(len, chunks)) > 4096:
                break
        return b"".join(chunks)
    try:
        text = (await asyncio.wait_for(loop.run_in_executor(None, read_all), timeout)).decode(errors="replace")
    except asyncio.TimeoutError:
        text = "error: no answer within 30 s"
    if text.strip() != "ok":
        reason = text.strip().removeprefix("error: ")[:500] or "it exited"
        raise VMError(f"cannot serve {what} to the VM: {reason}",
                      "capsem as root serves shared folders through idmapped mounts (Linux 5.12+, and a "
                      "filesystem that supports them: ext4, xfs, btrfs, tmpfs...); `capsem doctor --security` "
                      "checks this host")


async def start_virtiofsd(share: Share, paths_: RuntimePaths, qemu_identity: Identity | None = None) -> ManagedProcess:
    """Start virtiofsd for `share`. `qemu_identity`: the user QEMU runs as (it must be able to
    connect to the vhost-user socket).

    capsem as root: virtiofsd runs as a uid leased for it alone (never root, never the folder's
    owner), serving the folder through an idmapped mount that maps the owner to that uid
    (idmap_share.py). The lease is released when the process is closed."""
    folder = check_share_path(share.host_path)
    program = helpers.virtiofsd()
    sock = listening_socket(paths_.fs_socket(share.tag))
    if qemu_identity is not None:
        nofollow.chown(paths_.fs_socket(share.tag), qemu_identity.uid, qemu_identity.gid)
    lease = ready_r = ready_w = None
    try:
        fd = sock.fileno()
        source, stage, pass_fds = folder, [], [fd]
        if privsep.privileged():
            base = share_mount_base()
            st = os.stat(folder)
            lease = privsep.lease_uid()
            ready_r, ready_w = os.pipe()
            source = Path(idmap_share.target_for(str(base), str(folder)))
            stage = [sys.executable, "-I", idmap_share.__file__, str(folder), str(base), str(st.st_uid),
                     str(st.st_gid), str(lease.uid), str(ready_w), "1" if share.readonly else "0", "--"]
            pass_fds.append(ready_w)
        map_options, filter_inside = userns_options()
        argv = stage + [str(helpers.unshare().path), *map_options, "--mount", "--propagation", "private", "--"]
        inner = virtiofsd_args(program, share, fd, source)
        if share.readonly and program.dialect == "c" and lease is None:
            ro = [str(source)]  # (the idmapped mount is read-only itself)
        elif not share.readonly:
            ro = [str(source / p.relative_to(folder)) for p in await asyncio.to_thread(protected_paths, folder)]
        else:
            ro = []
        # virtiofsd's name-creating and writing calls are checked by this thread; armed once the idmap
        # stage (if any) is done: it mirrors the folder's host path, whose names are not the guest's
        guard = ShareGuard(share.tag, armed=lease is None)
        pass_fds += guard.pass_fds
        if filter_inside:
            inner = guard.wrap(inner)
        if ro:
            argv += ["sh", "-c", _RO_WRAPPER, "sh"] + ro + ["--"] + inner
        else:
            argv += inner
        log = CappedLog(paths_.root / f"virtiofsd-{share.tag}.log")
        try:
            proc = await spawn(f"virtiofsd[{share.tag}]", argv, pass_fds=tuple(pass_fds), stdout=log.fd,
                               stderr=log.fd, seccomp=None if filter_inside else guard.filter)
        except BaseException:
            guard.close()
            raise
        finally:
            log.close_writer()
        try:  # before the idmap stage's report: that stage already runs under the filter
            await guard.attach(proc)
        except BaseException:
            guard.close()
            await proc.stop(grace=1)
            raise
        proc.guard = guard  # lives as long as virtiofsd (tests reach it here)
        if lease is not None:
            proc.on_close.append(lease.release)
            lease = None
            os.close(ready_w)
            ready_w = None
            try:
                await _wait_ready(ready_r, str(folder))
            except BaseException:
                await proc.stop(grace=1)
                raise
            guard.armed = True  # before virtiofsd can serve anything: QEMU connects after we return
        return proc
    finally:
        sock.close()  # the child holds its own copy
        for end in (ready_r, ready_w):
            if end is not None:
                os.close(end)
        if lease is not None:
            lease.release()
