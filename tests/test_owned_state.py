"""No module-level mutable state in the host product code (capsem_vm, capsem_kernel) but the few
documented exceptions: state belongs to an owner object that someone creates and closes (issue 20,
egress_runtime.EgressRuntime for the proxy service and the audit log). A static read of the source:
`global` statements, module-level containers changed in place, attributes set on a class."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("capsem_vm", "capsem_kernel")
MUTATORS = {"append", "add", "update", "pop", "setdefault", "clear", "remove", "discard", "extend",
            "insert", "popitem"}

# (module, name): process-wide by necessity, or a cache; each says why and who owns it where it is
# defined (a comment with "owner" or "by necessity" on or just above the definition).
DOCUMENTED = {
    ("capsem_vm/egress_runtime.py", "_process"),       # the one accessor for provisioners
    ("capsem_kernel/loop_thread.py", "_loop"),         # the loop thread
    ("capsem_vm/policy/addresses.py", "_cache"),       # the host's own addresses, 5 s
    ("capsem_vm/vsock/hangup.py", "_lingering"),       # the process's bound on lingering streams
    ("capsem_vm/vsock/vhost_kernel.py", "_dispatch"),        # AF_VSOCK host ports are one per host
    ("capsem_vm/vsock/vhost_kernel.py", "_listeners"),
    ("capsem_vm/vsock/vhost_kernel.py", "_tasks"),           # strong references to its tasks
    ("capsem_vm/sweep.py", "_swept"),                  # one start-up sweep per process
}


def _sources():
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            yield path.relative_to(ROOT).as_posix(), path.read_text()


def module_state(source: str) -> set[str]:
    """Names of module-level state that `source` changes after import: `global` names, and
    module-level names changed in place (item assignment, a mutating method) or set as
    attributes of a class (`cls.x = ...`, `SomeClass.x = ...`)."""
    tree = ast.parse(source)
    module_names = {t.id for n in tree.body if isinstance(n, (ast.Assign, ast.AnnAssign))
                    for t in (n.targets if isinstance(n, ast.Assign) else [n.target]) if isinstance(t, ast.Name)}
    classes = {n.name for n in ast.walk(tree) if isinstance(n, ast.ClassDef)}
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Global):
            found.update(node.names)
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
              and node.func.attr in MUTATORS and isinstance(node.func.value, ast.Name)
              and node.func.value.id in module_names):
            found.add(node.func.value.id)
        elif isinstance(node, (ast.Assign, ast.AugAssign, ast.Delete)):
            targets = node.targets if isinstance(node, (ast.Assign, ast.Delete)) else [node.target]
            for t in targets:
                if isinstance(t, ast.Subscript) and isinstance(t.value, ast.Name) and t.value.id in module_names:
                    found.add(t.value.id)
                if (isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name)
                        and (t.value.id == "cls" or t.value.id in classes)):
                    found.add(f"{t.value.id}.{t.attr}")
    return found


def test_the_scan_finds_each_kind_of_module_state():
    src = """
_n = 0
_d = {}
_l = []
class C:
    inst = None
    @classmethod
    def make(cls):
        cls.inst = cls()
def f():
    global _n
    _n += 1
    _d["k"] = 1
    _l.append(2)
    C.other = 3
    local = {}
    local["x"] = 1
"""
    assert module_state(src) == {"_n", "_d", "_l", "cls.inst", "C.other"}


@pytest.mark.parametrize("module,source", list(_sources()), ids=lambda v: v if v.endswith(".py") else "")
def test_module_state_is_owned_or_documented(module, source):
    undocumented = {name for name in module_state(source) if (module, name) not in DOCUMENTED}
    assert not undocumented, (f"{module}: module-level state {sorted(undocumented)}: give it an owner object "
                              "(created and closed by whoever needs it), or, for a cache or process-wide "
                              "necessity, say why and who owns it where it is defined and list it in DOCUMENTED")


@pytest.mark.parametrize("module,name", sorted(DOCUMENTED))
def test_each_exception_says_who_owns_it(module, name):
    lines = (ROOT / module).read_text().splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith((f"{name} =", f"{name}:")))
    above = " ".join(lines[max(0, at - 5):at + 1]).lower()
    assert "owner" in above or "by necessity" in above, f"{module}:{at + 1}: {name} has no comment on its owner"
