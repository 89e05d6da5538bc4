"""capsem_vm.cli.run / group_main: how every command group ends, alone or under `capsem`."""
import pytest

from capsem_vm.cli import group_main
from capsem_vm.errors import CapsemError


def _group(outcome):
    def add_parser(sub):
        p = sub.add_parser("demo")
        p.add_argument("--n", type=int, default=0)
        p.set_defaults(func=outcome)
    return add_parser


def _raise(exc):
    def func(args):
        raise exc
    return func


@pytest.mark.parametrize("outcome, code, stderr", [
    (lambda args: args.n, 7, ""),
    (lambda args: None, 0, ""),
    (_raise(CapsemError("it broke", "do this")), 1, "capsem: error: it broke\n  hint: do this\n"),
    (_raise(KeyboardInterrupt()), 130, "capsem: interrupted\n"),
])
def test_a_group_run_alone_ends_as_capsem_would(outcome, code, stderr, capsys):
    assert group_main(_group(outcome), ["demo", "--n", "7"]) == code
    assert capsys.readouterr().err == stderr


def test_other_errors_are_not_swallowed():
    with pytest.raises(ZeroDivisionError):
        group_main(_group(lambda args: 1 // 0), ["demo"])


def test_help_of_every_command_writes_nothing(tmp_path):
    """`capsem --help` and each `capsem COMMAND --help` leave a fresh home as they found it (the
    audit command's help used to create the data dir to print the database's default path)."""
    import os
    import subprocess
    import sys

    from capsem_vm.cli import build_parser

    home = tmp_path / "home"
    home.mkdir()
    env = {**os.environ, "HOME": str(home), "XDG_DATA_HOME": str(home / "data"),
           "XDG_CONFIG_HOME": str(home / "config"), "XDG_CACHE_HOME": str(home / "cache"),
           "XDG_STATE_HOME": str(home / "state")}
    for k in ("CAPSEM_DATA_DIR", "CAPSEM_CACHE_DIR", "CAPSEM_CONFIG_DIR"):
        env.pop(k, None)
    commands = [a for a in build_parser()._subparsers._group_actions[0].choices]
    assert "audit" in commands and "setup" in commands
    for argv in [["--help"], *([c, "--help"] for c in commands)]:
        r = subprocess.run([sys.executable, "-m", "capsem_vm", *argv], env=env, capture_output=True, text=True,
                           timeout=60)
        assert r.returncode == 0, (argv, r.stderr)
        assert not any(home.iterdir()), (argv, sorted(str(p) for p in home.rglob("*")))
