"""`capsem doctor --security`: the security posture of this host, and whether any of it is weak.

Each check returns (status, detail): "ok", "info" (a fact worth knowing) or "weak" (a setting that
lowers the boundary; the command then exits non-zero). A check that cannot run reports "weak":
an unknown posture is not a good one.
"""

from __future__ import annotations

import os
import stat
import subprocess
from collections.abc import Callable
from pathlib import Path

from . import accel, helpers, paths, privsep
from .errors import CapsemError

OK, INFO, WEAK = "ok", "info", "weak"
QEMU_SANDBOX = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"

Result = tuple[str, str]


def check_accelerator() -> Result:
    choice = accel.choose("auto")
    if choice.accel == "kvm":
        return OK, f"kvm: {choice.reason}"
    return INFO, f"tcg (emulation): {choice.reason}"


def check_seccomp(actions_avail: str = "/proc/sys/kernel/seccomp/actions_avail") -> Result:
    """The kernel filters syscalls (and hands calls to a supervisor: the share guard), and this QEMU
    accepts the sandbox capsem asks for."""
    try:
        status = Path("/proc/self/status").read_text()
        actions = Path(actions_avail).read_text().split()
    except OSError as exc:
        return WEAK, f"cannot read the kernel's seccomp support: {exc}"
    if "Seccomp:" not in status or "errno" not in actions:
        return WEAK, "this kernel has no seccomp filter support: QEMU and virtiofsd run unfiltered"
    if "user_notif" not in actions:
        return WEAK, ("this kernel has no seccomp user notification: shares cannot be guarded against "
                      "planted repositories (virtiofsd will not start)")
    qemu = helpers.qemu()
    try:
        out = subprocess.run([str(qemu.path), "-machine", "none", "-nodefaults", "-display", "none",
                              "-sandbox", QEMU_SANDBOX, "-qmp", "stdio"],
                             input=b'{"execute":"qmp_capabilities"}\n{"execute":"quit"}\n',
                             capture_output=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return WEAK, f"cannot run {qemu.path}: {exc}"
    if out.returncode != 0:
        msg = out.stderr.decode(errors="replace").strip().splitlines()
        return WEAK, f"QEMU refuses -sandbox ({msg[-1] if msg else out.returncode}): built without seccomp?"
    return OK, (f"kernel seccomp filters; QEMU runs with -sandbox {QEMU_SANDBOX}; virtiofsd with a deny filter "
                "and the share guard (user notification); vhost-device-vsock with a deny filter and the exec gate")


def check_helper_privileges() -> Result:
    if not privsep.privileged():
        return _check_user_confinement()
    # root: QEMU/vsock as a leased uid; virtiofsd as the share owner in a user namespace
    probe = privsep.HELPER_UID_BASE + privsep.HELPER_UID_COUNT - 1
    try:
        out = subprocess.run([str(helpers.unshare().path), "--map-root-user", "--mount", "true"],
                             user=probe, group=probe, extra_groups=[], capture_output=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as exc:
        return WEAK, f"cannot test user namespaces: {exc}"
    if out.returncode != 0:
        return WEAK, ("capsem runs as root but unprivileged user namespaces are disabled: "
                      "virtiofsd cannot drop to the share owner (" + out.stderr.decode(errors="replace").strip() + ")")
    return OK, (f"capsem runs as root; QEMU and vhost-device-vsock run as a per-VM uid in "
                f"{privsep.HELPER_UID_BASE}..{privsep.HELPER_UID_BASE + privsep.HELPER_UID_COUNT - 1}, "
                "each virtiofsd as a uid of its own in a user namespace (see 'share ids')")


def _check_user_confinement() -> Result:
    """A normal user's QEMU and vsock backend run in namespaces of their own (confine.py): try it."""
    import tempfile
    from . import confine
    with tempfile.TemporaryDirectory(dir=paths.runtime_dir()) as d:
        try:
            out = subprocess.run(confine.wrap(["/bin/true"], d), cwd=d, capture_output=True, timeout=30)
        except (OSError, subprocess.SubprocessError, CapsemError) as exc:
            return WEAK, f"cannot confine the helpers: {exc}"
    if out.returncode != 0:
        return WEAK, ("QEMU and vhost-device-vsock cannot get namespaces of their own here (user namespaces "
                      "disabled?): " + out.stderr.decode(errors="replace").strip()[-300:])
    return OK, (f"helpers run as you (uid {os.geteuid()}), unprivileged: QEMU and vhost-device-vsock in their own "
                "user, pid, mount, network and IPC namespaces with your home and /tmp hidden; virtiofsd in a "
                "user namespace")


def check_share_identity(probe_dir: str | None = None) -> Result:
    """A root capsem serves shares through idmapped mounts (virtiofsd never root): can this host?"""
    if not privsep.privileged():
        return OK, f"virtiofsd runs as you (uid {os.geteuid()}) in a user namespace"
    import sys
    import tempfile
    from . import idmap_share, virtiofs
    base = virtiofs.share_mount_base()
    leased = privsep.HELPER_UID_BASE + privsep.HELPER_UID_COUNT - 2
    with tempfile.TemporaryDirectory(dir=probe_dir) as folder:
        folder = os.path.realpath(folder)
        r, w = os.pipe()
        try:
            subprocess.run([sys.executable, "-I", idmap_share.__file__, folder, str(base), "0", "0", str(leased),
                            str(w), "0", "--", "true"], pass_fds=(w,), capture_output=True, timeout=30)
            os.close(w)
            w = -1
            answer = os.read(r, 4096).decode(errors="replace").strip()
        finally:
            os.close(r)
            if w >= 0:
                os.close(w)
    if answer != "ok":
        return WEAK, (f"idmapped mounts do not work on {os.path.dirname(folder)}'s filesystem "
                      f"({answer.removeprefix('error: ')}): a root capsem refuses to share folders there")
    return OK, (f"shares are idmapped mounts served by a leased uid, never root (checked on "
                f"{os.path.dirname(folder)}'s filesystem)")


def check_image_owner() -> Result:
    """A root capsem boots only images root alone can change (image/trust.py)."""
    from .image.store import default_image_dir
    from .image.trust import check_root_only
    if not privsep.privileged():
        return OK, "capsem runs as you: your images are yours"
    image = default_image_dir()
    check_root_only(image)  # raises ImageError (reported as weak) naming what others could write
    return OK, f"{image} and every directory above it: root's, writable by root only"


def check_host_sysctls() -> Result:
    weak = []
    for name, want in (("fs/protected_hardlinks", "1"), ("fs/protected_symlinks", "1")):
        try:
            value = Path(f"/proc/sys/{name}").read_text().strip()
        except OSError:
            continue
        if value != want:
            weak.append(f"{name.replace('/', '.')}={value} (want {want})")
    if weak:
        return WEAK, ", ".join(weak) + ": links planted by other users in shared directories are followed"
    return OK, "fs.protected_hardlinks=1, fs.protected_symlinks=1"


def check_policy() -> Result:
    from .policy import ALLOW, PolicyError, load_kernel_policy
    from .policy.match import is_special_address
    try:
        policy = load_kernel_policy(None)
    except PolicyError as exc:
        return WEAK, f"the default policy does not load: {exc}"
    allows = [r for r in policy.rules if r.action == ALLOW]
    broad = [r.name for r in allows if r.host.kind == "any"]
    special = [r.name for r in allows if _names_special(r, is_special_address)]
    if broad:
        return WEAK, f"{policy.source}: rule(s) {', '.join(broad)} allow every host"
    if special:
        return WEAK, f"{policy.source}: rule(s) {', '.join(special)} allow loopback/private/link-local addresses"
    if not allows:
        return OK, f"{policy.source}: deny all"
    return OK, f"{policy.source}: default deny, {len(allows)} allow rule(s) for named hosts"


def check_observe(specs: dict | None = None) -> Result:
    """Observe mode lets what the policy refuses go out (recorded as would-deny): weak wherever it is
    on, in the user's policy, in an installed capsem kernelspec (`--observe`) or in its policy file.
    `specs`: KernelSpecManager().get_all_specs() (default: read now). Not seen here: a Jupyter
    config setting c.CapsemProvisioner.observe_mode (the kernel's audit rows still say would-deny)."""
    from .policy import PolicyError, load_kernel_policy, load_policy
    found, errors = [], []
    try:
        user = load_kernel_policy(None)
        if user.observe:
            found.append(f"the user policy {user.source}")
    except PolicyError:
        pass  # the policy check reports it
    if specs is None:
        try:
            from jupyter_client.kernelspec import KernelSpecManager
            specs = KernelSpecManager().get_all_specs()
        except Exception as exc:  # noqa: BLE001 - no Jupyter here, or a broken spec dir
            specs, errors = {}, [f"cannot list kernelspecs ({exc.__class__.__name__}: {exc})"]
    for name, info in sorted(specs.items()):
        prov = ((info.get("spec") or {}).get("metadata") or {}).get("kernel_provisioner") or {}
        if prov.get("provisioner_name") != "capsem-provisioner":
            continue
        config = prov.get("config") or {}
        if config.get("observe_mode") is True:  # capsem kernel install --observe
            found.append(f"kernelspec {name!r} (installed with --observe)")
            continue
        path = config.get("policy")
        if not path:
            continue
        try:
            if load_policy(path).observe:
                found.append(f"kernelspec {name!r} ({path})")
        except PolicyError as exc:
            errors.append(f"kernelspec {name!r}: {exc.message}")
    if found:
        return WEAK, ("OBSERVE MODE is on in " + ", ".join(found) + ": requests the policy would deny are "
                      "LET THROUGH and only recorded as would-deny (for trusted code only; remove "
                      "`observe = true` from [settings], or reinstall the kernelspec without --observe)")
    if errors:
        return WEAK, "; ".join(errors)
    return OK, "observe mode is off (the user policy and every capsem kernelspec's policy enforce their rules)"


def _names_special(rule, is_special_address) -> bool:
    nets = list(rule.addresses) + ([rule.host.value] if rule.host.kind == "net" else [])
    return any(is_special_address(n.network_address) for n in nets)


def check_ca_key() -> Result:
    from .proxy.ca import KEY_FILE, ca_dir
    d = ca_dir()
    key = d / KEY_FILE
    try:
        dst = os.lstat(d)
    except FileNotFoundError:
        return OK, f"no CA yet ({d} is created with mode 0700, the key 0600, on first use)"
    try:
        kst = os.lstat(key)
    except FileNotFoundError:
        kst = None
    problems = []
    if dst.st_uid != os.geteuid() or dst.st_mode & 0o077:
        problems.append(f"{d} is mode {stat.S_IMODE(dst.st_mode):04o} uid {dst.st_uid}")
    if kst is not None and (not stat.S_ISREG(kst.st_mode) or kst.st_uid != os.geteuid() or kst.st_mode & 0o077):
        problems.append(f"{key} is mode {stat.S_IMODE(kst.st_mode):04o} uid {kst.st_uid}")
    if problems:
        return WEAK, "CA private key readable beyond its owner: " + "; ".join(problems)
    return OK, f"{key} mode 0600 in a 0700 dir, host only (never sent to a guest)"


def check_runtime_dir() -> Result:
    root = paths.runtime_dir()
    st = os.lstat(root)
    if stat.S_IMODE(st.st_mode) != 0o700 or st.st_uid != os.geteuid():
        return WEAK, f"{root} is mode {stat.S_IMODE(st.st_mode):04o}"
    return OK, f"{root} mode 0700; one 0700 dir per VM"


def check_vsock() -> Result:
    from .vsock.base import vhost_vsock_usable
    if vhost_vsock_usable():
        return INFO, ("kernel vhost-vsock: guest connections are dispatched by peer CID; host ports "
                      "5000-5005 are shared by all processes on this host")
    return OK, "vhost-user (vhost-device-vsock): each VM's ports are Unix sockets in its 0700 dir"


CHECKS: list[tuple[str, Callable[[], Result]]] = [
    ("accelerator", check_accelerator),
    ("seccomp", check_seccomp),
    ("helpers", check_helper_privileges),
    ("share ids", check_share_identity),
    ("image owner", check_image_owner),
    ("sysctls", check_host_sysctls),
    ("policy", check_policy),
    ("observe", check_observe),
    ("ca key", check_ca_key),
    ("runtime dir", check_runtime_dir),
    ("vsock", check_vsock),
]


def report(checks=CHECKS, out=print) -> int:
    weak = 0
    for name, fn in checks:
        try:
            status, detail = fn()
        except CapsemError as exc:
            status, detail = WEAK, exc.message
        except Exception as exc:  # noqa: BLE001 - a check must never crash the report
            status, detail = WEAK, f"{exc.__class__.__name__}: {exc}"
        weak += status == WEAK
        out(f"  {status.upper():5} {name:12} {detail}")
    out("security posture: no weak settings" if not weak else f"security posture: {weak} weak setting(s)")
    return 1 if weak else 0
