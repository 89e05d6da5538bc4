"""python3 -m capsem_vm.setup [options]: `capsem setup` without the capsem command (`make system`
runs it with the system's python3 before any venv exists)."""

import argparse
import sys

from .cli import add_parser


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="capsem")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["setup", *(sys.argv[1:] if argv is None else argv)])
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
