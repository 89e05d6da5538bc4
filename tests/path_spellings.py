"""Spellings of a request path, and how a liberal server reads a request target (no tests here).

Used by the pure property tests (tests/test_policy_paths.py), the host-side tests through the real
proxy service (tests/test_proxy_paths_addresses.py) and the real-VM module
(tests/security/test_egress_attacks.py).

- `denied_spelling(base)`: a hypothesis strategy; random mixes, at random positions, of the
  spellings servers treat as the same path: percent-encoding (any case, doubled, IIS %uXXXX,
  overlong UTF-8), case, repeated slashes, encoded slashes and backslashes, `;params`, dot
  segments (`/x/../`, `/x/..;/`, `%2e`), NUL and fullwidth characters, a query or a fragment.
- `rfc_spelling(base)`: only RFC 3986 equivalent spellings (escapes of unreserved characters,
  dot segments): a server must receive `base` itself.
- `liberal_readings(target)`: every path a liberal server could resolve the raw target to (decode
  all escapes until nothing changes, %uXXXX and overlong UTF-8 too, NFKC, casefold, backslash as
  slash, strip `;params`, collapse slashes, resolve dots; NUL kept, dropped or ending the path).
  This is the test oracle, written independently of capsem_vm/policy/paths.py.
"""

from __future__ import annotations

import fnmatch
import re
import unicodedata
from urllib.parse import unquote_to_bytes

from hypothesis import strategies as st

UNRESERVED = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~"


# --- the oracle -------------------------------------------------------------------------------------

_OVERLONG = re.compile(rb"[\xc0\xc1][\x80-\xbf]")
_IIS = re.compile(rb"%u([0-9a-fA-F]{4})")


def _decode_once(data: bytes) -> bytes:
    data = _IIS.sub(lambda m: chr(int(m.group(1), 16)).encode("utf-8", "surrogatepass"), data)
    data = unquote_to_bytes(data)
    return _OVERLONG.sub(lambda m: bytes([((m.group(0)[0] & 0x1F) << 6) | (m.group(0)[1] & 0x3F)]), data)


def _resolve_dots(path: str) -> str:
    out: list[str] = []
    segs = path.split("/")[1:]
    for i, seg in enumerate(segs):
        if seg in (".", ".."):
            if seg == ".." and out:
                out.pop()
            if i == len(segs) - 1:
                out.append("")
        else:
            out.append(seg)
    return "/" + "/".join(out)


def liberal_readings(target: bytes | str) -> set[str]:
    if isinstance(target, str):
        target = target.encode("utf-8", "surrogateescape")
    raw = re.split(rb"[?#]", target, maxsplit=1)[0]
    for _ in range(5):
        decoded = _decode_once(raw)
        if decoded == raw:
            break
        raw = decoded
    text = raw.decode("utf-8", "replace")
    readings = set()
    for variant in (text, text.replace("\x00", ""), text.split("\x00", 1)[0]):
        v = unicodedata.normalize("NFKC", variant).casefold().replace("\\", "/")
        v = re.split(r"[?#]", v, maxsplit=1)[0]  # decoded '?' or '#' ending the path
        v = "/".join(seg.split(";", 1)[0] for seg in v.split("/"))
        v = re.sub("/{2,}", "/", v if v.startswith("/") else "/" + v)
        readings.add(_resolve_dots(v))
    return readings


def reads_as(target: bytes | str, globs) -> bool:
    """True if a liberal server could resolve `target` to a path matching one of `globs`."""
    return any(fnmatch.fnmatchcase(r, g.casefold()) for r in liberal_readings(target) for g in globs)


# --- spellings ----------------------------------------------------------------------------------------

def _char(c: str):
    options = [st.just(c), st.just(c.swapcase()),
               st.sampled_from([f"%{ord(c):02x}", f"%{ord(c):02X}"]) if ord(c) < 128 else st.just(c),
               st.just(f"%25{ord(c):02X}") if ord(c) < 128 else st.just(c),
               st.just(f"%u{ord(c):04x}")]
    if c.isascii() and c.isalnum():
        full = chr(0xFF00 + ord(c) - 0x20)  # fullwidth form (NFKC folds it back)
        options += [st.just(full), st.just("".join(f"%{b:02X}" for b in full.encode()))]
    if c == ".":
        options.append(st.just("%c0%ae"))
    return st.one_of(options)


def _segment(seg: str):
    return st.tuples(*[_char(c) for c in seg]).map("".join)


_JUNK = st.sampled_from(["x", "X", "static", "a.b", "%61"])
_FIRST_SEP = st.one_of(
    st.sampled_from(["/", "//", "///", "/./", "/%2e/", "/;x/", "/.;/"]),
    _JUNK.map(lambda j: f"/{j}/../"), _JUNK.map(lambda j: f"/{j}/..;/"), _JUNK.map(lambda j: f"/{j}/%2e%2e/"),
    _JUNK.map(lambda j: f"/{j}/.%2e/"), _JUNK.map(lambda j: f"/{j}//../../"),
)
_SEP = st.one_of(_FIRST_SEP, st.sampled_from(["%2f", "%2F", "\\", "%5c", "%252f", "%c0%af", "\\..\\x\\..\\",
                                              "/x%2f..%2f", "\uff0f"]))
_PARAM = st.sampled_from(["", "", "", ";", ";x", ";jsessionid=1", "%3bx", "%00", "%00.html", "\x01"])
_TAIL = st.sampled_from(["", "", "/", "?q=1", "#frag", "/.", "/x/..", "%3Fq", "%23x", ";"])


@st.composite
def denied_spelling(draw, base: str) -> str:
    """A spelling of `base` (e.g. "/admin/users") a liberal server may resolve to `base`."""
    segs = base.strip("/").split("/")
    out = []
    for i, seg in enumerate(segs):
        out.append(draw(_FIRST_SEP if i == 0 else _SEP))
        out.append(draw(_segment(seg)))
        out.append(draw(_PARAM))
    out.append(draw(_TAIL))
    return "".join(out)


def _rfc_char(c: str):
    if c in UNRESERVED:
        return st.sampled_from([c, f"%{ord(c):02x}", f"%{ord(c):02X}"])
    return st.just(c)


@st.composite
def rfc_spelling(draw, base: str) -> str:
    """An RFC 3986 equivalent spelling of `base`: escaped unreserved characters, dot segments."""
    out = []
    for i, seg in enumerate(base.strip("/").split("/")):
        out.append(draw(st.sampled_from(["/", "/./", "/%2e/", "/x/../", "/x/%2E%2e/"] + (["/.%2E/"] if i == 0 else []))))
        out.append("".join(draw(_rfc_char(c)) for c in seg))
    if base.endswith("/"):
        out.append(draw(st.sampled_from(["/", "/.", "/%2E", "/x/.."])))
    return "".join(out)
