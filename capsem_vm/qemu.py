"""The one place that builds the QEMU command line, from a typed config. Pure: no I/O.

Paths into the VM's runtime dir are relative: QEMU runs with that dir as its cwd, so an
unprivileged QEMU (privsep.py) needs no access to the dirs above it (and socket paths stay short).
"""

from __future__ import annotations

from dataclasses import dataclass

from .config import RuntimePaths, VMConfig

# no_timer_check: on a loaded host a TCG guest can fail the IO-APIC timer check and panic at boot.
# cryptomgr.notests: no crypto self-tests at boot (about 0.5 s of guest CPU under TCG, measured
# with bench/boot.py's floor); the algorithms are the kernel's own, tested by its build.
BASE_KERNEL_ARGS = ("console=ttyS0", "panic=-1", "quiet", "reboot=t", "no_timer_check", "cryptomgr.notests")
# TCG only: QEMU's emulated TSC is one clock for all vCPUs, but the guest's boot-time sync check
# fails under emulation ("Marking TSC unstable due to TSCs unsynchronized") and the guest falls
# back to the HPET, whose every read is an emulated MMIO access: clock_gettime() in the guest was
# 12x slower (20000 time.monotonic() calls: 0.68 s on hpet, 0.057 s on tsc). Under KVM the guest
# picks its clock itself (kvm-clock), so this is not forced there.
TCG_KERNEL_ARGS = ("tsc=reliable",)

# TCG's translation cache (MB). QEMU 7.2's default is 1 GiB, and what the guest's code fills of it
# stays resident: ~124 MB PSS per idle pooled VM after ipykernel's imports (bench/density.py). A
# full cache is flushed and refilled, costing guest CPU; 64 MB kept the cold start and the first
# cell at their old times (bench/density.py prints both beside the memory).
TCG_TB_SIZE_MB = 64
# Free page reporting hands back free blocks of 2^order pages; the kernel's default (9: 2 MB)
# leaves the small free blocks dropping the page cache makes: order 5 (128 KB) returned 13 MB more
# per idle pooled VM (bench/density.py).
BALLOON_KERNEL_ARGS = ("page_reporting.page_reporting_order=5",)


def accel_args(accel: str) -> list[str]:
    """-accel with its options: under TCG a bounded translation cache (TCG_TB_SIZE_MB)."""
    return ["-accel", f"tcg,tb-size={TCG_TB_SIZE_MB}" if accel == "tcg" else accel]


def balloon_args() -> list[str]:
    """virtio-balloon with free page reporting only: the guest tells QEMU which of its RAM is free
    (in free blocks of 2^order pages, BALLOON_KERNEL_ARGS, a few seconds after they were freed) and QEMU discards it (a hole punched in the
    guest RAM memfd), so a pooled VM's host memory shrinks back after its boot and warm-up.
    New guest-reachable host code (QEMU's in-process balloon device): the guest can report free
    pages and inflate/deflate within its own RAM, never get more than -m (tests/test_density_vm.py).
    No stats polling and no deflate-on-oom: the host never asks the guest for memory."""
    return ["-device", "virtio-balloon-pci,id=balloon,free-page-reporting=on"]


@dataclass(frozen=True)
class BootAssets:
    """Paths QEMU opens for the verified assets (usually /dev/fd/N of fds we hashed)."""

    kernel: str
    initrd: str
    rootfs: str


def overlay_mb(config: VMConfig) -> int:
    """Cap of the guest's writable root (tmpfs upper layer of the overlay): half its memory.
    Beyond it, writes fail with ENOSPC in the guest instead of exhausting its memory."""
    return max(64, config.memory_mb // 2)


def kernel_cmdline(config: VMConfig, accel: str = "tcg") -> str:
    accel_args = TCG_KERNEL_ARGS if accel == "tcg" else ()
    return " ".join(BASE_KERNEL_ARGS + accel_args + BALLOON_KERNEL_ARGS + (f"capsem.overlay_mb={overlay_mb(config)}",)
                    + tuple(config.kernel_args))


def build_command(qemu_binary: str, config: VMConfig, accel: str, paths: RuntimePaths,
                  assets: BootAssets, vsock_args: list[str], console: str | None = None) -> list[str]:
    """console: where the serial console goes (default the file console.log in the VM dir; the
    VM passes /dev/fd/N of a size-capped pipe, see caplog.py)."""
    mem = f"{config.memory_mb}M"
    cpu = "host" if accel == "kvm" else "max"
    cmd = [
        qemu_binary,
        # the VM dir in the name: tells which VM a QEMU process belongs to (ps, tests)
        "-name", f"guest=capsem:{str(paths.root).replace(',', ',,')},debug-threads=on",
        "-nodefaults", "-no-user-config", "-nographic", "-display", "none",
        "-no-reboot",  # guest power-off, reboot or panic ends QEMU
        # No NIC: no -netdev/-nic at all. The only ways out are vsock and VirtioFS.
        "-machine", "q35,memory-backend=mem",
        *accel_args(accel),
        "-cpu", cpu,
        "-smp", str(config.cpus),
        "-m", mem,
        # vhost-user backends need guest RAM they can map: a shared memfd.
        "-object", f"memory-backend-memfd,id=mem,size={mem},share=on",
        "-kernel", assets.kernel,
        "-initrd", assets.initrd,
        "-append", kernel_cmdline(config, accel),
        "-drive", f"file={assets.rootfs},if=none,id=rootfs,format=raw,readonly=on",
        "-device", "virtio-blk-pci,drive=rootfs",
        "-serial", f"file:{console or paths.console_log.name}",
        # Two QMP monitors (one client each): the owner's, held for the VM's life, and one for the
        # claimer of a pooled VM (qmp.py).
        "-qmp", f"unix:{paths.qmp_owner.name},server=on,wait=off",
        "-qmp", f"unix:{paths.qmp.name},server=on,wait=off",
        # seccomp: no spawning, no privilege changes, no obsolete syscalls.
        "-sandbox", "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny",
        # A spare PCIe root port so a VirtioFS share can be hot-plugged into a booted VM.
        "-device", "pcie-root-port,id=rp1,bus=pcie.0,chassis=1",
        *balloon_args(),
    ]
    cmd += vsock_args
    for share in config.shares:
        chardev = f"fs-{share.tag}"
        cmd += [
            "-chardev", f"socket,id={chardev},path={paths.fs_socket(share.tag).name}",
            "-device", f"vhost-user-fs-pci,chardev={chardev},tag={share.tag}",
        ]
    return cmd
