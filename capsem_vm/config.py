"""Typed VM configuration and the layout of a VM's private runtime directory."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .dirfile import DirFile

DEFAULT_MEMORY_MB = 1024
DEFAULT_CPUS = 2
MIN_MEMORY_MB = 256
MAX_CPUS = 64


@dataclass(frozen=True)
class Share:
    """A host folder shared into the guest over VirtioFS, at `guest_path` (same path by default)."""

    host_path: Path
    tag: str
    readonly: bool = False

    @property
    def guest_path(self) -> str:
        return str(self.host_path)


@dataclass(frozen=True)
class EgressConfig:
    """The VM's way out (capsem_vm/egress.py): every byte through the policy proxy."""

    policy: str | None = None      # policy file; None: the user's config dir, else deny-all
    kernel_id: str | None = None   # who the audit log names; None: a generated "vm-<hex>"
    observe: bool = False          # observe mode on top of the policy file (as [settings] observe = true)


@dataclass(frozen=True)
class VMConfig:
    memory_mb: int = DEFAULT_MEMORY_MB
    cpus: int = DEFAULT_CPUS
    accel: str = "auto"
    image: str | None = None  # image dir or None for the default image
    shares: tuple[Share, ...] = ()
    boot_timeout: float = 180.0  # TCG boots are slow; a loaded CI machine slower still
    kernel_args: tuple[str, ...] = ()
    egress: EgressConfig | None = None  # None: the guest has no way out at all

    def __post_init__(self):
        if not MIN_MEMORY_MB <= self.memory_mb <= 1 << 20:
            raise ValueError(f"memory must be at least {MIN_MEMORY_MB} MB, got {self.memory_mb}")
        if not 1 <= self.cpus <= MAX_CPUS:
            raise ValueError(f"cpus must be between 1 and {MAX_CPUS}, got {self.cpus}")
        tags = [s.tag for s in self.shares]
        if len(set(tags)) != len(tags):
            raise ValueError("share tags must be unique")


@dataclass(frozen=True)
class RuntimePaths:
    """Files in a VM's runtime dir (mode 0700). Names are short: socket paths max out at 107 bytes."""

    root: Path

    qmp = DirFile("qmp.sock")              # QMP for whoever claims a pooled VM (or a person debugging it); qmp.py
    qmp_owner = DirFile("qmp-owner.sock")  # QMP held by the VM's owner (vm.py) for the VM's life
    console_log = DirFile("console.log")
    vsock_backend = DirFile("vsock.vu")  # vhost-user socket between QEMU and vhost-device-vsock
    vsock_uds = DirFile("v.sock")        # host end of the guest's vsock (vhost-device-vsock --uds-path)
    owner = DirFile("owner")             # pid of the capsem process that owns this VM (stale-dir detection)
    pids = DirFile("pids")               # helper pids, for cleaning up after a crashed owner

    def fs_socket(self, tag: str) -> Path:
        return self.root / f"fs-{tag}.vu"
