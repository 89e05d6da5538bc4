"""Guest-chosen text made safe to store, print and log: control characters escaped.

Host names, DNS names, paths, URLs and reasons that quote them come from the guest. Written raw
to a terminal (`capsem audit`), a log file or a browser, an ESC sequence could repaint the
screen, a CR/LF could forge a line, a bidi override could make `moc.live` read as `evil.com`.

    escape(text)     at the boundary where rows are recorded and in log calls with guest text:
                     every C0 control, DEL, C1 control, U+2028/U+2029, bidi embedding/override/
                     isolate/mark characters and lone surrogates become `\\xHH` / `\\uHHHH`, and a
                     backslash becomes `\\\\` (so an escaped form can never be forged by typing it).
    printable(text)  for output of stored text: the same characters escaped, backslashes left
                     alone (stored rows are escaped already; older rows and any other text stay
                     safe without being escaped twice).
"""

from __future__ import annotations

import re

# C0, DEL, C1; line/paragraph separators; bidi marks, embeddings, overrides and isolates
# (U+061C, U+200E-U+200F, U+202A-U+202E, U+2066-U+2069); lone surrogates (only via \\u escapes)
_UNSAFE = "\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069\ud800-\udfff"
_UNSAFE_RE = re.compile(f"[{_UNSAFE}]")
_UNSAFE_OR_BACKSLASH_RE = re.compile(f"[{_UNSAFE}\\\\]")


def _sub(m: re.Match) -> str:
    c = m.group()
    if c == "\\":
        return "\\\\"
    n = ord(c)
    return f"\\x{n:02x}" if n < 0x100 else f"\\u{n:04x}"


def escape(text: str) -> str:
    """Guest text as it is stored and logged (see the module doc)."""
    if text.isascii() and text.isprintable() and "\\" not in text:
        return text  # the common case: nothing to do
    return _UNSAFE_OR_BACKSLASH_RE.sub(_sub, text)


def printable(text: str) -> str:
    """Stored text as it is printed: unsafe characters escaped, backslashes left as they are."""
    if text.isascii() and text.isprintable():
        return text
    return _UNSAFE_RE.sub(_sub, text)


def printable_value(value):
    return printable(value) if isinstance(value, str) else value

