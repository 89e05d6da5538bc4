"""The `capsem` command."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from .errors import CapsemError

# Sub-command groups living in their own packages; each module exposes add_parser(subparsers).
_GROUPS = (
    "capsem_vm.image.cli",
    "capsem_vm.vm_cli",
    "capsem_vm.pool.cli",
    "capsem_vm.doctor",
    "capsem_vm.policy.cli",
    "capsem_vm.proxy.cli",
    "capsem_kernel.cli",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="capsem",
        description="Run Jupyter kernels and commands in hardware-isolated QEMU VMs.",
        epilog="Run `capsem COMMAND --help` for the options of a command.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log details to stderr")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in _GROUPS:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name and name.startswith(exc.name):
                continue  # that part is not built yet
            raise
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="capsem: %(message)s")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except CapsemError as exc:
        print(f"capsem: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("capsem: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
