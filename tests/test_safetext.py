"""capsem_vm.safetext: guest text as it is stored, printed and logged (issue 15 item 7)."""

from __future__ import annotations

import re

from hypothesis import given, settings
from hypothesis import strategies as st

from capsem_vm.safetext import escape, printable

# the oracle, independent of the module: what must never reach a terminal, a log line or a browser
UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069\ud800-\udfff]")
DANGEROUS = st.sampled_from(["\x1b[2J", "\x1b]0;t\x07", "\r\n", "\x00", "\x7f", "\x9b", "\u2028", "\u2029",
                             "\u202e", "\u2066", "\u200f", "\ud800", "\\", "\\x1b", "é", "日本"])
texts = st.lists(st.one_of(st.text(max_size=8), DANGEROUS), max_size=8).map("".join)


def _unescape(s: str) -> str:
    return re.sub(r"\\(\\|x[0-9a-f]{2}|u[0-9a-f]{4})",
                  lambda m: "\\" if m.group(1) == "\\" else chr(int(m.group(1)[1:], 16)), s)


@settings(max_examples=500)
@given(texts)
def test_escaped_text_is_safe_and_loses_nothing(text):
    out = escape(text)
    assert not UNSAFE.search(out)
    out.encode("utf-8")                  # lone surrogates are gone too
    assert _unescape(out) == text        # injective: a typed escape never passes for a real one
    assert printable(out) == out         # printing stored text does not escape it twice


@settings(max_examples=500)
@given(texts)
def test_printable_is_safe_for_any_text(text):
    out = printable(text)
    assert not UNSAFE.search(out)
    assert printable(out) == out


def test_examples():
    assert escape("a\x1b[2Jb\r\n") == "a\\x1b[2Jb\\x0d\\x0a"
    assert escape("moc.\u202elive") == "moc.\\u202elive"
    assert escape("C:\\x1b") == "C:\\\\x1b"
    assert escape("plain.example.com/path?q=1") == "plain.example.com/path?q=1"
    assert escape("café.example") == "café.example"   # other non-ASCII stays readable
