"""Kernel modules for the initramfs: which ones, in which order, from the modules' own deps."""

from __future__ import annotations

import shutil
from pathlib import Path

from capsem_vm.errors import ImageError

# Loaded by /init, before the root filesystem can be mounted and the agent can reach the host
# (deps are added automatically).
BOOT_MODULES = ("virtio_pci", "virtio_blk", "erofs", "overlay", "vmw_vsock_virtio_transport")

# Loaded by /init in the background while the agent starts: nothing needs them before the host
# mounts a share (after the agent's hello; a mount that comes earlier makes the kernel load them).
# virtio_balloon: free page reporting hands the guest's free RAM back to the host (qemu.py
# balloon_args); nothing needs it before the agent's hello.
BACKGROUND_MODULES = ("virtiofs", "virtio_balloon")

# Shipped (not loaded) so `nft` can set up NAT/redirect rules in the guest: copied to the
# guest's /lib/modules/<ver> with real depmod indexes, loaded on demand by modprobe/the kernel.
ON_DEMAND_MODULES = (
    "nf_tables", "nft_chain_nat", "nft_nat", "nft_redir", "nft_masq", "nft_ct", "nft_reject",
    "nft_reject_inet", "nft_reject_ipv4", "nft_reject_ipv6", "nft_compat", "nft_tproxy", "nft_socket",
    "nft_limit", "nft_log", "nf_log_syslog", "nft_fib_inet", "nft_fib_ipv4", "nft_fib_ipv6",
    # egress capture (capsem_agent/netsetup.py): the dummy interface gives the NIC-less guest a
    # default route, so connect() reaches the nftables redirect instead of failing ENETUNREACH
    "dummy",
)

# Files depmod needs to know what is built in (so `modprobe <builtin>` succeeds).
_DEPMOD_INPUTS = ("modules.builtin", "modules.builtin.modinfo", "modules.order")


def read_modules_dep(moddir: Path) -> dict[str, tuple[str, list[str]]]:
    """module name -> (relative path, [relative paths of direct and indirect deps])."""
    try:
        text = (moddir / "modules.dep").read_text()
    except OSError as e:
        raise ImageError(f"cannot read {moddir}/modules.dep: {e}", "delete the kernel layer and rebuild")
    table = {}
    for line in text.splitlines():
        if ":" not in line:
            continue
        path, deps = line.split(":", 1)
        table[module_name(path)] = (path, deps.split())
    return table


def read_softdeps(moddir: Path) -> dict[str, list[str]]:
    """module -> modules it wants loaded first ("softdep x pre: y" from modules.softdep)."""
    soft = {}
    try:
        text = (moddir / "modules.softdep").read_text()
    except OSError:
        return soft
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 3 and parts[0] == "softdep":
            pre = []
            for word in parts[2:]:
                if word == "post:":
                    break
                if word != "pre:":
                    pre.append(word)
            soft[parts[1].replace("-", "_")] = pre
    return soft


def module_name(path: str) -> str:
    name = Path(path).name
    for suffix in (".ko", ".ko.xz", ".ko.zst", ".ko.gz"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
    return name.replace("-", "_")


def load_order(moddir: Path, roots: tuple[str, ...]) -> list[str]:
    """Relative paths of `roots` and everything they need, each after its dependencies."""
    table = read_modules_dep(moddir)
    soft = read_softdeps(moddir)
    by_path = {path: name for name, (path, _) in table.items()}
    order: list[str] = []
    state: dict[str, str] = {}

    def visit(name: str, chain: tuple[str, ...]):
        if state.get(name) == "done":
            return
        if state.get(name) == "visiting":
            raise ImageError(f"module dependency cycle: {' -> '.join(chain + (name,))}")
        state[name] = "visiting"
        path, deps = table[name]
        # Soft "pre" deps that exist as modules (absent ones are built in, e.g. crc32c).
        for dep in [by_path[d] for d in deps] + [s for s in soft.get(name, []) if s in table]:
            visit(dep, chain + (name,))
        state[name] = "done"
        order.append(path)

    for root in roots:
        if root not in table:
            raise ImageError(f"kernel module {root!r} not found in {moddir}",
                             "the kernel package changed; update capsem_vm/image/modules.py")
        visit(root, ())
    return order


def copy_modules(src_moddir: Path, dst_moddir: Path, relpaths: list[str]) -> None:
    """Copy a module subset (plus depmod's inputs) so depmod can index just that subset."""
    for rel in relpaths:
        target = dst_moddir / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src_moddir / rel, target)
    for name in _DEPMOD_INPUTS:
        if (src_moddir / name).exists():
            shutil.copy2(src_moddir / name, dst_moddir / name)
