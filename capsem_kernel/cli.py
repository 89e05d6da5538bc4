"""`capsem kernel install`: make the capsem kernel available to Jupyter front ends."""

from __future__ import annotations

from pathlib import Path

from capsem_vm.config import DEFAULT_CPUS, DEFAULT_MEMORY_MB

from . import kernelspec


def add_parser(sub) -> None:
    kernel = sub.add_parser("kernel", help="manage the capsem Jupyter kernelspec",
                            description="Manage the capsem Jupyter kernelspec.")
    ksub = kernel.add_subparsers(dest="kernel_command", metavar="COMMAND")
    p = ksub.add_parser("install", help="install the capsem kernelspec",
                        description="Install a kernelspec whose kernels each run in their own VM.",
                        epilog="Then: jupyter console --kernel capsem, or pick it in JupyterLab.")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--user", action="store_true", help="install for the current user only")
    where.add_argument("--sys-prefix", action="store_true", help="install into this Python env (sys.prefix)")
    where.add_argument("--prefix", metavar="P", help="install under prefix P")
    p.add_argument("--name", default=kernelspec.DEFAULT_NAME, help="kernel name (default: capsem)")
    p.add_argument("--display-name", default=kernelspec.DEFAULT_DISPLAY_NAME, help="name shown in front ends")
    p.add_argument("--memory", type=int, default=DEFAULT_MEMORY_MB, metavar="MB", help="guest memory per kernel")
    p.add_argument("--cpus", type=int, default=DEFAULT_CPUS, metavar="N", help="virtual CPUs per kernel")
    p.add_argument("--share-mode", choices=("rw", "ro"), default="rw", help="notebook folder shared read-write or read-only")
    p.add_argument("--policy", metavar="FILE", help="egress policy file (host-side; absolute path stored)")
    p.add_argument("--accel", choices=("auto", "kvm", "tcg"), default="auto", help="accelerator")
    p.add_argument("--image", metavar="DIR", help="VM image directory (default: the built default image)")
    p.set_defaults(func=cmd_install)
    kernel.set_defaults(func=lambda args: kernel.print_help() or 2)


def cmd_install(args) -> int:
    if args.memory < 256 or not 1 <= args.cpus <= 64:
        print("capsem: error: --memory must be >= 256 and --cpus between 1 and 64")
        return 2
    config = {"memory_mb": args.memory, "cpus": args.cpus, "share_mode": args.share_mode, "accel": args.accel}
    if args.policy:
        policy = Path(args.policy).resolve()
        if not policy.is_file():
            print(f"capsem: error: --policy {args.policy}: no such file")
            return 2
        config["policy"] = str(policy)
    if args.image:
        config["image"] = str(Path(args.image).resolve())
    prefix = kernelspec.sys_prefix() if args.sys_prefix else args.prefix
    path = kernelspec.install(args.name, args.display_name, user=args.user, prefix=prefix, provisioner_config=config)
    print(f"installed kernelspec {args.name!r} in {path}")
    return 0
