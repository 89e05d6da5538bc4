"""The I/O of `capsem policy suggest`: refused rows read from the audit database, suggestions
appended to a policy file. The logic is in suggest.py (sans-IO).

Appending is all or nothing: the file is parsed before and after in memory, the new text must
declare the old rules plus exactly the suggested ones and the same credentials, the file must not
have changed while the user was deciding, and a failed write is cut back to the old length. The
file is appended to in place (same inode, mode, owner; a symlinked policy stays a symlink).
"""

from __future__ import annotations

import datetime
import difflib
import os
import re
import sqlite3
import time
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path

from .loader import MAX_POLICY_BYTES, PolicyError, parse_policy
from .suggest import append_text, rule_key, user_rules

COLUMNS = ("kernel", "kind", "method", "url", "host", "port", "decision", "rule", "code", "count")
_RELATIVE = re.compile(r"^(\d+(?:\.\d+)?)\s*([smhdw])$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


class SuggestError(Exception):
    """Nothing was written; the message says why."""


def parse_since(text: str, now: float | None = None) -> float:
    """Unix time from `30m`, `2h`, `1d` (ago), an ISO 8601 time (local time unless it has an
    offset) or a number of seconds since the epoch. ValueError otherwise."""
    now = time.time() if now is None else now
    text = text.strip()
    if m := _RELATIVE.match(text):
        return now - float(m.group(1)) * _UNITS[m.group(2)]
    try:
        return float(text)
    except ValueError:
        pass
    return datetime.datetime.fromisoformat(text).timestamp()


def read_refusals(db: Path, *, kernel: str | None = None, since: float | None = None) -> Iterator[dict]:
    """The refused rows (decision deny, or would-deny in observe mode), oldest first, streamed from a read-only connection."""
    if not db.exists():
        raise SuggestError(f"no audit database at {db} (run a kernel first, or pass --db)")
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)
    try:
        have = {r[1] for r in con.execute("PRAGMA table_info(events)")}
        cols = ", ".join(c if c in have else f"NULL AS {c}" for c in COLUMNS)
        where, args = ["decision IN ('deny', 'would-deny')"], []  # would-deny: observe mode
        if kernel:
            where.append("kernel = ?")
            args.append(kernel)
        if since is not None:
            where.append("COALESCE(last_ts, ts) >= ?" if "last_ts" in have else "ts >= ?")
            args.append(since)
        cur = con.execute(f"SELECT {cols} FROM events WHERE {' AND '.join(where)} ORDER BY id", args)
        for row in cur:
            yield dict(zip(COLUMNS, row))
    except sqlite3.OperationalError as exc:
        if "no such table" not in str(exc):
            raise SuggestError(f"cannot read {db}: {exc}") from None
    finally:
        con.close()


def _read_all(fd: int) -> bytes:
    chunks, offset = [], 0
    while chunk := os.pread(fd, 1 << 16, offset):
        chunks.append(chunk)
        offset += len(chunk)
        if offset > MAX_POLICY_BYTES:
            raise SuggestError(f"the policy file is larger than {MAX_POLICY_BYTES} bytes")
    return b"".join(chunks)


def _credentials(text: str) -> list:
    creds = tomllib.loads(text).get("credential", [])
    return creds if isinstance(creds, list) else [creds]


def plan(old_text: str, addition: str, expected: list[dict], source: str) -> str:
    """The new file text, after checking it: it parses, declares the old rules followed by exactly
    `expected`, and the same credentials. SuggestError otherwise."""
    try:
        before = parse_policy(old_text, source)
    except PolicyError as exc:
        raise SuggestError(f"the policy file is invalid, fix it first: {exc}") from None
    new_text = append_text(old_text, addition)
    try:
        after = parse_policy(new_text, source)
    except PolicyError as exc:
        raise SuggestError(f"the file would not parse with the suggestions appended ({exc})") from None
    want = [rule_key(r) for r in user_rules(before)] + [rule_key(d) for d in expected]
    if [rule_key(r) for r in user_rules(after)] != want:
        raise SuggestError("the file with the suggestions appended would not declare exactly its rules plus "
                           "the suggested ones")
    if _credentials(new_text) != _credentials(old_text):
        raise SuggestError("appending would change the file's credentials")
    return new_text


def diff(old_text: str, new_text: str, path: Path) -> str:
    return "".join(difflib.unified_diff(old_text.splitlines(keepends=True), new_text.splitlines(keepends=True),
                                        f"{path} (now)", f"{path} (with the suggestions)"))


def apply(path: Path, addition: str, expected: list[dict], confirm: Callable[[str], bool]) -> bool:
    """Append `addition` (the rendered suggestions declaring `expected`) to the policy file at
    `path` (created if missing), after confirm(diff text) says yes. True if written, False if the
    user said no; SuggestError (file untouched) on any problem."""
    path = Path(path).expanduser()
    created = False
    try:
        fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CLOEXEC)
    except FileNotFoundError:
        fd = None
    except OSError as exc:
        raise SuggestError(f"cannot open {path}: {exc.strerror or exc}") from None
    try:
        old = _read_all(fd) if fd is not None else b""
        try:
            old_text = old.decode("utf-8")
        except UnicodeDecodeError:
            raise SuggestError(f"{path} is not UTF-8") from None
        new_text = plan(old_text, addition, expected, str(path))
        if not confirm(diff(old_text, new_text, path)):
            return False
        if fd is None:
            try:
                fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
                created = True
            except OSError as exc:
                raise SuggestError(f"cannot create {path}: {exc.strerror or exc}") from None
        if _read_all(fd) != old:
            raise SuggestError(f"{path} changed while you were deciding: nothing written, run suggest again")
        data = new_text.encode("utf-8")[len(old):]
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
            if _read_all(fd) != old + data:
                raise SuggestError(f"{path} changed while it was written")
        except BaseException as exc:
            try:
                os.ftruncate(fd, len(old))  # back to what it was
            except OSError:
                pass
            if created:
                path.unlink(missing_ok=True)
            if isinstance(exc, OSError):
                raise SuggestError(f"cannot write {path}: {exc.strerror or exc} (left as it was)") from None
            raise
        return True
    finally:
        if fd is not None:
            os.close(fd)
