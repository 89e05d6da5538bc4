"""A kernel's network log: rows of the egress audit database (capsem_vm/proxy/audit.py), shaped
for the Sandbox panel. Read-only SQLite; safe to call from a worker thread."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from capsem_vm.safetext import printable_value

# refused, and what observe mode let through that the policy refuses: both are what a user acts on
BLOCKED = ("deny", "would-deny")
_IN_BLOCKED = "decision IN (?, ?)"
MAX_LIMIT = 5000


def _path(kind: str, url: str | None) -> str:
    """The path (and query) of an HTTP/WebSocket URL; '' for DNS names and host:port."""
    if not url or kind not in ("http", "websocket"):
        return ""
    try:
        parts = urlsplit(url)
    except ValueError:
        return ""
    return (parts.path or "/") + (f"?{parts.query}" if parts.query else "")


def shape_row(r: dict) -> dict[str, Any]:
    """One audit row as the panel shows it (time, decision, method, host, path, status, rule).
    Text goes through safetext.printable (rows are escaped when written; older rows too)."""
    r = {k: printable_value(v) for k, v in r.items()}
    return {
        "id": r["id"], "ts": r["ts"], "kind": r["kind"], "decision": r.get("decision"),
        "method": r.get("method"), "host": r.get("host"), "port": r.get("port"),
        "path": _path(r["kind"], r.get("url")), "url": r.get("url"), "status": r.get("status"),
        "rule": r.get("rule"), "reason": r.get("reason"), "code": r.get("code"),
        "count": r.get("count") or 1, "first_ts": r.get("first_ts"), "last_ts": r.get("last_ts"),
        "node": r.get("node") or "",
        "bytes_out": r.get("bytes_out"), "bytes_in": r.get("bytes_in"), "duration_ms": r.get("duration_ms"),
    }


def _connect(db_path: Path) -> sqlite3.Connection | None:
    if not db_path.exists():
        return None
    con = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=10, isolation_level=None)
    con.row_factory = sqlite3.Row
    return con


def query(db_path: Path | str, kernel_id: str, *, after_id: int = 0, blocked: bool = False,
          host: str = "", limit: int = 500) -> dict[str, Any]:
    """Rows of `kernel_id` with id > after_id, oldest first (the newest `limit` of them), filtered
    to refusals (deny, and would-deny in observe mode) if `blocked` and to hosts containing `host`; plus the kernel's totals."""
    limit = max(1, min(int(limit), MAX_LIMIT))
    empty = {"rows": [], "last_id": after_id, "total": 0, "blocked": 0}
    con = _connect(Path(db_path))
    if con is None:
        return empty
    try:
        where, args = ["kernel = ?", "id > ?"], [kernel_id, int(after_id)]
        if blocked:
            where.append(_IN_BLOCKED)
            args.extend(BLOCKED)
        if host:
            where.append("host LIKE ? ESCAPE '\\'")
            args.append("%" + host.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%")
        sql = (f"SELECT * FROM (SELECT * FROM events WHERE {' AND '.join(where)} ORDER BY id DESC LIMIT ?) "
               "ORDER BY id")
        try:
            con.execute("BEGIN")  # one snapshot: rows and totals agree (WAL readers see a consistent view)
            rows = [shape_row(dict(r)) for r in con.execute(sql, [*args, limit])]
            # totals count events, not rows: an aggregated row stands for `count` of them
            # (a database no writer has migrated yet has no count column: one event per row)
            n = "count" if any(c[1] == "count" for c in con.execute("PRAGMA table_info(events)")) else "1"
            total, blocked_n, last = con.execute(
                f"SELECT COALESCE(SUM({n}), 0), COALESCE(SUM(CASE WHEN {_IN_BLOCKED} THEN {n} ELSE 0 END), 0), "
                "COALESCE(MAX(id), 0) FROM events WHERE kernel = ?",
                (*BLOCKED, kernel_id)).fetchone()
            con.execute("COMMIT")
        except sqlite3.OperationalError as exc:
            if "no such table" in str(exc):
                return empty
            raise
        return {"rows": rows, "last_id": max(int(after_id), last), "total": total, "blocked": blocked_n}
    finally:
        con.close()


def refused_row(db_path: Path | str, kernel_id: str, row_id: int, columns: tuple[str, ...]) -> dict | None:
    """Row `row_id` of `kernel_id` with `columns` (NULL for columns an older database lacks), if it
    is a refusal (deny, or would-deny); else None. What "allow this host" suggests from."""
    con = _connect(Path(db_path))
    if con is None:
        return None
    try:
        have = {c[1] for c in con.execute("PRAGMA table_info(events)")}
        cols = ", ".join(c if c in have else f"NULL AS {c}" for c in columns)
        row = con.execute(f"SELECT {cols} FROM events WHERE id = ? AND kernel = ? AND {_IN_BLOCKED}",
                          (int(row_id), kernel_id, *BLOCKED)).fetchone()
        return dict(row) if row is not None else None
    except sqlite3.OperationalError as exc:
        if "no such table" in str(exc):
            return None
        raise
    finally:
        con.close()
