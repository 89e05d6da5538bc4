"""What a pool keeps warm (PoolConfig), and its one command-line form: the options of
`capsem pool start`, parsed here (add_start_options, from_args) and written back here (to_argv)
for the processes that start a pool (the daemonizing `capsem pool start`, the provisioner)."""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass

from ..config import DEFAULT_CPUS, DEFAULT_MEMORY_MB
from ..errors import VMError
from . import wire


@dataclass(frozen=True)
class PoolConfig:
    size: int = 2
    memory_mb: int = 1024
    cpus: int = 2
    image: str | None = None
    accel: str = "auto"
    budget_mb: int = 0          # 0: what all flavours' VMs need together
    parallel: int = 2           # boots at once, all flavours (each boot is CPU-heavy under TCG)
    boot_timeout: float = 300.0
    more: tuple[wire.Shape, ...] = ()  # further flavours to keep warm (--flavour)

    def __post_init__(self):
        keys = [(s.memory_mb, s.cpus, s.image) for s in self.shapes]
        if len(set(keys)) != len(keys):
            raise VMError("each flavour (memory, CPUs, image) may be given once", "merge the counts")

    @property
    def shapes(self) -> tuple[wire.Shape, ...]:
        """Every flavour kept, each with its image (a flavour without one boots the pool's)."""
        more = tuple(s if s.image else dataclasses.replace(s, image=self.image) for s in self.more)
        return (wire.Shape(self.memory_mb, self.cpus, self.size, self.image),) + more

    @property
    def budget(self) -> int:
        return self.budget_mb or sum(s.size * s.memory_mb for s in self.shapes)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> PoolConfig:
        """The options add_start_options declared, checked (images are not looked up here)."""
        if args.size < 0 or args.parallel < 1:
            raise VMError("--size must be >= 0 and --parallel >= 1")
        try:
            wire.Shape.checked(args.memory, args.cpus, args.size)
            more = tuple(wire.Shape.parse(text) for text in args.flavour)
        except wire.WireError as exc:
            raise VMError(str(exc), "see capsem pool start --help") from None
        return cls(size=args.size, memory_mb=args.memory, cpus=args.cpus, image=args.image, accel=args.accel,
                   budget_mb=args.budget, parallel=args.parallel, boot_timeout=args.boot_timeout, more=more)

    def to_argv(self) -> list[str]:
        """The `capsem pool start` options that from_args turns back into this config
        (`--opt=value`: a value starting with '-' stays a value)."""
        argv = [f"--size={self.size}", f"--memory={self.memory_mb}", f"--cpus={self.cpus}", f"--accel={self.accel}",
                f"--budget={self.budget_mb}", f"--parallel={self.parallel}", f"--boot-timeout={self.boot_timeout!r}"]
        argv += [f"--image={self.image}"] if self.image else []
        for shape in self.more:
            image = f",{shape.image}" if shape.image else ""
            argv.append(f"--flavour={shape.memory_mb},{shape.cpus},{shape.size}{image}")
        return argv


def add_start_options(start: argparse.ArgumentParser) -> None:
    start.add_argument("--size", type=int, default=2, help="warm VMs to keep (default 2)")
    start.add_argument("--memory", type=int, default=DEFAULT_MEMORY_MB, help="guest memory in MB")
    start.add_argument("--cpus", type=int, default=DEFAULT_CPUS, help="virtual CPUs per VM")
    start.add_argument("--flavour", action="append", default=[], metavar="MB,CPUS,N[,IMAGE]",
                       help="also keep N warm VMs of this memory, CPU count and image (name or dir; "
                            "default: --image) (repeatable; for kernelspecs with other memory_mb/cpus/image; "
                            "a kernel claims only a VM of its own)")
    start.add_argument("--image", default=None,
                       help="image name or dir of the --size VMs and of flavours without one (default: the default image)")
    start.add_argument("--accel", choices=("auto", "kvm", "tcg"), default="auto")
    start.add_argument("--budget", type=int, default=0,
                       help="memory budget in MB for pooled VMs (default: what all flavours' VMs need)")
    start.add_argument("--parallel", type=int, default=2, help="VMs booting at once (default 2)")
    start.add_argument("--boot-timeout", type=float, default=300.0)
