"""Request paths as servers read them: one canonical spelling, a loose reading, and what is ambiguous.

Why: the guest chooses every byte of a request target, and servers disagree about what those
bytes name. `/%61dmin`, `//admin`, `/ADMIN`, `/admin;x` and `/x/..;/admin` are all `/admin` to
some server. A deny rule matched against the raw bytes is bypassed by such spellings, so every
path is first put into one form, and the proxy sends exactly that form upstream.

`canonicalize(raw)` -> CanonicalPath(path, loose, ambiguous):

- `path`: the RFC 3986 section 6.2.2 form of the path (no query): escapes of unreserved
  characters (A-Z a-z 0-9 - . _ ~) decoded, the remaining escapes uppercased, characters that may
  not appear raw in a path (controls, space, non-ASCII, `"<>\\^`{|}#[]`) percent-encoded as UTF-8,
  then dot segments removed (section 5.2.4, after decoding, so `%2e%2e` is `..`). Allow rules with
  `paths` match it exactly (case-sensitive), and the proxy replaces the request's path with it
  (guard.requestheaders): the upstream receives the path that was judged.
- `loose`: what a liberal server could make of `path`: every escape decoded, NFKC, casefolded,
  backslashes read as `/`, `;parameters` cut from every segment, repeated slashes collapsed, dot
  segments removed again. Deny rules with `paths` match it (and `path`), case-insensitively.
- `ambiguous`: "" or why servers may still disagree about `path`: encoded separators (`%2F`,
  `%5C`), encoded `%` (double encoding), `;` parameters (raw or `%3B`), encoded `?`/`#` or a raw
  `#`, backslashes, NUL and control characters (raw or encoded), malformed escapes (`%u002e`,
  `%2`), escaped or raw bytes that are not UTF-8 (overlong `%C0%AE`), and characters whose NFKC
  form holds a separator or a dot (fullwidth `．`). An ambiguous path never matches an allow
  rule with `paths` and always matches a deny rule with `paths`, except npm's scoped package
  spelling `/@scope%2Fname` (`two_readings`): its only two readings are `path` and `loose`, and a
  deny rule matches it when its globs match either.

Everything here is total (any str, never raises) and linear in the input.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from urllib.parse import unquote_to_bytes

UNRESERVED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
# allowed raw in a path segment besides unreserved and '%': sub-delims, ':' and '@' (RFC 3986 pchar)
_RAW_OK = frozenset("!$&'()*+,;=:@/")
_HEX = frozenset("0123456789abcdefABCDEF")
# escaped bytes whose meaning differs between servers (see the module docstring)
_AMBIGUOUS_BYTES = {0x2F: "encoded '/'", 0x5C: "encoded '\\'", 0x25: "encoded '%' (double encoding)",
                    0x3B: "encoded ';'", 0x3F: "encoded '?'", 0x23: "encoded '#'"}
_STRUCTURAL = frozenset("/\\.;%?#")


# npm's spelling of a scoped package in a registry path, `/@scope%2Fname` (npm-package-arg escapes
# the name's '/'; names are lowercase URL-safe, not starting with '.' or '_'). Its one ambiguity is
# that encoded '/': servers read it exactly two ways, `path` itself and `loose` (`/@scope/name`, no
# escape, dot or ';' left to read otherwise), so deny rules can judge both readings (Rule._match_path).
_NPM_SCOPED = re.compile(r"/@[a-z0-9~-][a-z0-9._~-]{0,213}%2F[a-z0-9~-][a-z0-9._~-]{0,213}")


@dataclass(frozen=True)
class CanonicalPath:
    path: str
    loose: str
    ambiguous: str  # "" when servers agree on `path`

    @property
    def two_readings(self) -> bool:
        """Ambiguous only as npm's `/@scope%2Fname` is: `path` and `loose` are all its readings."""
        return bool(self.ambiguous) and _NPM_SCOPED.fullmatch(self.path) is not None


def _escape_bytes(data: bytes) -> str:
    return "".join(f"%{b:02X}" for b in data)


def _encode_char(ch: str) -> tuple[str, bool]:
    """Percent-encode one raw character; True if its bytes are not valid UTF-8 (a lone surrogate)."""
    try:
        return _escape_bytes(ch.encode("utf-8")), False
    except UnicodeEncodeError:
        try:
            return _escape_bytes(ch.encode("utf-8", "surrogateescape")), True
        except UnicodeEncodeError:
            return _escape_bytes(ch.encode("utf-8", "surrogatepass")), True


def remove_dot_segments(path: str) -> str:
    """RFC 3986 section 5.2.4 for an absolute path (starting with '/')."""
    segments = path.split("/")[1:]
    out: list[str] = []
    last = len(segments) - 1
    for i, seg in enumerate(segments):
        if seg == ".":
            if i == last:
                out.append("")
        elif seg == "..":
            if out:
                out.pop()
            if i == last:
                out.append("")
        else:
            out.append(seg)
    return "/" + "/".join(out)


def _normalize_escapes(raw: str, keep: frozenset[str] = frozenset()) -> tuple[str, list[str]]:
    """Decode unreserved escapes, uppercase the others, encode what may not be raw. Returns the text
    and the reasons it is ambiguous. `keep`: raw characters left alone (glob metacharacters)."""
    out: list[str] = []
    why: list[str] = []
    escaped = bytearray()  # the current run of escaped bytes, checked as UTF-8 when it ends

    def end_run():
        if escaped:
            try:
                text = escaped.decode("utf-8")
            except UnicodeDecodeError:
                why.append("escaped bytes that are not UTF-8")
            else:
                _check_unicode(text, why)
            escaped.clear()

    i, n = 0, len(raw)
    while i < n:
        ch = raw[i]
        if ch == "%":
            if i + 2 < n and raw[i + 1] in _HEX and raw[i + 2] in _HEX:
                b = int(raw[i + 1:i + 3], 16)
                i += 3
                c = chr(b)
                if c in UNRESERVED:
                    end_run()
                    out.append(c)
                    continue
                out.append(f"%{b:02X}")
                if b in _AMBIGUOUS_BYTES:
                    why.append(_AMBIGUOUS_BYTES[b])
                elif b < 0x20 or b == 0x7F:
                    why.append("encoded control character")
                if b >= 0x80:
                    escaped.append(b)
                else:
                    end_run()
                continue
            end_run()
            why.append("malformed escape")
            out.append("%")
            i += 1
            continue
        end_run()
        i += 1
        if ch in UNRESERVED or ch in _RAW_OK or ch in keep:
            out.append(ch)
            if ch == ";":
                why.append("';' parameters")
            continue
        if ch == "\\":
            why.append("backslash")
        elif ch in "#?":
            why.append(f"raw {ch!r}")
        elif ch < " " or ch == "\x7f":
            why.append("control character")
        enc, bad = _encode_char(ch)
        if bad:
            why.append("raw bytes that are not UTF-8")
        elif ord(ch) >= 0x80:
            _check_unicode(ch, why)
        out.append(enc)
    end_run()
    return "".join(out), why


def _check_unicode(text: str, why: list[str]) -> None:
    """Non-ASCII text some servers fold (NFKC) into separators or dots, e.g. fullwidth '．'."""
    if text.isascii():
        return
    folded = unicodedata.normalize("NFKC", text)
    if any(c in _STRUCTURAL for c in folded) or any(ord(c) < 0x20 for c in folded):
        why.append("characters that fold into separators or dots")


def _loose(path: str) -> str:
    text = unquote_to_bytes(path).decode("utf-8", "replace")
    text = unicodedata.normalize("NFKC", text).casefold().replace("\\", "/")
    text = "/".join(seg.split(";", 1)[0] for seg in text.split("/"))
    text = re.sub("/{2,}", "/", text)
    if not text.startswith("/"):
        text = "/" + text
    return remove_dot_segments(text)


_PLAIN = re.compile(r"/[A-Za-z0-9\-._~!$&'()*+,=:@/]*")  # fullmatch: '$' would let a final "\n" in
_DOTS_OR_SLASHES = re.compile(r"(^|/)\.\.?(/|$)|//")


def canonicalize(raw: str) -> CanonicalPath:
    """The canonical form, loose reading and ambiguity of a request path (no query). Total."""
    if not isinstance(raw, str):
        raw = str(raw)
    if _PLAIN.fullmatch(raw) and not _DOTS_OR_SLASHES.search(raw):
        # why: most paths are already canonical (no escapes, dots, ';' or repeated slashes)
        return CanonicalPath(raw, raw.lower(), "")
    text, why = _normalize_escapes(raw)
    if not text.startswith("/"):
        text = "/" + text
    path = remove_dot_segments(text)
    return CanonicalPath(path, _loose(path), "; ".join(dict.fromkeys(why)))


def canonical_target(target: str) -> str:
    """An origin-form request target (path?query) with its path canonicalized; the query is kept as
    is. Targets that are not origin form ("*", authority form) are returned unchanged."""
    if not isinstance(target, str) or not target.startswith("/"):
        return target
    path, sep, query = target.partition("?")
    return canonicalize(path).path + sep + query


# --- globs ------------------------------------------------------------------------------------------

_GLOB_META = frozenset("*?[]")


def allow_glob(glob: str) -> str:
    """A `paths` glob in the canonical spelling (escapes as canonicalize writes them; glob
    metacharacters kept), to match CanonicalPath.path."""
    text, _ = _normalize_escapes(glob, keep=_GLOB_META)
    return text


def deny_glob(glob: str) -> str:
    """A `paths` glob in the loose spelling, to match CanonicalPath.loose."""
    text = unquote_to_bytes(glob).decode("utf-8", "replace")
    text = unicodedata.normalize("NFKC", text).casefold().replace("\\", "/")
    return re.sub("/{2,}", "/", text)
