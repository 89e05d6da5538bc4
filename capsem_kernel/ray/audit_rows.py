"""A remote kernel's audit rows, from its node's database to the front end's, tagged with the node.

The node reads its rows of the kernel (capsem_vm.proxy.audit.read_events) and sends them in
batches over the TLS control connection (each message below the wire's bound); the front end
stores them in its own audit database under the same kernel id with `node` set to the node's
name, so the server extension's network log and Sandbox's `Execution.network` read them as they
read a local kernel's rows.

Rows are checked field by field on the front end (types, lengths): the node is ours, but the
text in them was caused by the guest. A row is stored under the kernel id of the connection it
came on, never the one it names, so a node cannot write rows for another kernel.
"""

from __future__ import annotations

import json
import math
import sqlite3
from pathlib import Path
from typing import Any

from capsem_vm.proxy.audit import COLUMNS, MAX_TEXT, connect
from capsem_vm.safetext import escape

BATCH_BYTES = 48 * 1024   # encoded rows per control message (the wire bounds a message at 64 KiB)
ROW_TEXT = 1024           # text per field of a row sent across (rows are escaped: a URL fits)
MAX_NODE = 200
_TEXT = frozenset({"kind", "method", "url", "host", "decision", "rule", "reason", "code"})
_INT = frozenset({"port", "status", "bytes_out", "bytes_in", "count"})
_REAL = frozenset({"ts", "duration_ms", "first_ts", "last_ts"})
SENT = ("id",) + tuple(c for c in COLUMNS if c not in ("kernel", "node"))


def _trim(row: dict) -> dict:
    return {k: (v[:ROW_TEXT] if isinstance(v, str) else v) for k, v in row.items() if k in SENT}


def batches(rows: list[dict], limit: int = BATCH_BYTES) -> list[list[dict]]:
    """`rows` (node side, read from its database) split into lists whose JSON is below `limit`."""
    out: list[list[dict]] = []
    current: list[dict] = []
    size = 0
    for row in rows:
        row = _trim(row)
        n = len(json.dumps(row)) + 2
        if current and size + n > limit:
            out.append(current)
            current, size = [], 0
        current.append(row)
        size += n
    if current:
        out.append(current)
    return out


def _number(value: Any, kind: type) -> Any:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    if kind is int:
        return int(value) if isinstance(value, int) and abs(value) < 1 << 62 else None
    return float(value) if math.isfinite(value) else None


def clean_row(row: Any) -> dict | None:
    """One row from a node as the front end stores it (columns checked), or None if unusable.
    Total: never raises, whatever `row` is."""
    if not isinstance(row, dict):
        return None
    out: dict[str, Any] = {}
    for key in COLUMNS:
        value = row.get(key)
        if key in _TEXT:
            out[key] = escape(value[:MAX_TEXT]) if isinstance(value, str) else None
        elif key in _INT:
            out[key] = _number(value, int)
        elif key in _REAL:
            out[key] = _number(value, float)
    if out.get("ts") is None or not out.get("kind"):
        return None
    if out.get("count") is None or out["count"] < 1:
        out["count"] = 1
    return out


def node_label(name: Any) -> str:
    """The node's name as rows carry it (escaped, bounded; '?' when it has none)."""
    return escape(name[:MAX_NODE]) if isinstance(name, str) and name else "?"


def store(db_path: Path | str, kernel_id: str, node: str, rows: list[Any]) -> int:
    """Insert the usable ones of `rows` into the front end's database; returns how many."""
    cleaned = [r for r in map(clean_row, rows if isinstance(rows, list) else []) if r is not None]
    if not cleaned:
        return 0
    label = node_label(node)
    values = [tuple(kernel_id if c == "kernel" else label if c == "node" else r.get(c) for c in COLUMNS)
              for r in cleaned]
    sql = f"INSERT INTO events ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))})"
    try:
        con = connect(db_path)
    except (sqlite3.Error, OSError):
        return 0
    try:
        con.execute("BEGIN")
        con.executemany(sql, values)
        con.execute("COMMIT")
    except sqlite3.Error:
        return 0
    finally:
        con.close()
    return len(values)
