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
