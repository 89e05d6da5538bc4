"""The `capsem` command."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from typing import Callable

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
    "capsem_vm.setup.cli",
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


def run(args: argparse.Namespace) -> int:
    """Run the parsed sub-command (its `func`): a capsem error becomes its message on stderr and
    exit code 1, Ctrl-C exit code 130."""
    try:
        return int(args.func(args) or 0)
    except CapsemError as exc:
        print(f"capsem: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("capsem: interrupted", file=sys.stderr)
        return 130


def group_main(add_parser: Callable[[argparse._SubParsersAction], object], argv: list[str] | None) -> int:
    """One command group alone (`python -m capsem_vm.policy.cli policy check ...`), run as
    `capsem` runs it."""
    parser = argparse.ArgumentParser(prog="capsem")
    add_parser(parser.add_subparsers(dest="command", required=True))
    return run(parser.parse_args(argv))


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="capsem: %(message)s")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
