"""SECURITY.md names, for every defence, the tests that check it: every test it names must exist
(a renamed or deleted test would leave the policy citing nothing)."""

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SECURITY_MD = REPO / "SECURITY.md"

CITATION = re.compile(r"`(tests/[\w/]+\.py)(?:::(\w+))?`")
FILE_WITH_NAMES = re.compile(r"`(tests/[\w/]+\.py)` \(([^)]*)\)")


def defined_tests(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    return {node.name for node in ast.walk(tree)
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name.startswith("test_")}


def citations(text: str) -> list[tuple[str, str | None]]:
    found = [(m.group(1), m.group(2)) for m in CITATION.finditer(text)]
    for m in FILE_WITH_NAMES.finditer(text):  # "`tests/x.py` (`test_a`, `test_b`)"
        found += [(m.group(1), name) for name in re.findall(r"`(test_\w+)`", m.group(2))]
    return found


def test_every_test_security_md_cites_exists():
    text = SECURITY_MD.read_text()
    cited = citations(text)
    assert len(cited) > 50, "SECURITY.md should cite the tests of each defence"
    missing = []
    for file, name in cited:
        path = REPO / file
        if not path.is_file():
            missing.append(file)
        elif name and name not in defined_tests(path):
            missing.append(f"{file}::{name}")
    assert not missing, f"SECURITY.md cites tests that do not exist: {missing}"


def test_every_adversarial_test_file_is_cited():
    text = SECURITY_MD.read_text()
    cited_files = {file for file, _ in citations(text)}
    suite = {f"tests/security/{p.name}" for p in (REPO / "tests" / "security").glob("test_*.py")}
    assert suite <= cited_files, f"not described in SECURITY.md: {sorted(suite - cited_files)}"


def test_policy_sections_required_by_the_project_are_present():
    text = SECURITY_MD.read_text()
    for heading in ("## Supported versions", "## Reporting a vulnerability", "## Threat model",
                    "### In scope", "### Out of scope"):
        assert heading in text
    for promise in ("7 days", "14 days", "90 days", "GitHub Security Advisories", "credit"):
        assert promise in text
