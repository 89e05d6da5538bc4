"""The audit log: one SQLite table in capsem_vm.paths.data_dir(), written by the proxy service
(connections, HTTP, WebSocket, TCP) and by each VM's egress bridge (DNS, refused streams).

Writers never block the event loop: rows go through a bounded deque to one writer thread that
batches inserts (WAL mode, so several processes and `capsem audit --follow` can share the file).
If the queue overflows, rows are dropped and a row saying how many is written instead.
Secrets never reach this module unredacted: URLs pass through `redact_url`.
"""

from __future__ import annotations

import collections
import os
import re
import sqlite3
import threading
import time
from pathlib import Path
from urllib.parse import parse_qsl, quote, urlsplit, urlunsplit

from .. import paths

DB_NAME = "audit.sqlite3"
COLUMNS = ("ts", "kernel", "kind", "method", "url", "host", "port", "status", "bytes_out", "bytes_in",
           "duration_ms", "decision", "rule", "reason")
SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY,
    ts REAL NOT NULL,            -- unix time the event started
    kernel TEXT NOT NULL,        -- kernel id (who)
    kind TEXT NOT NULL,          -- dns | connect | http | websocket | tcp | note
    method TEXT,                 -- HTTP method, DNS query type
    url TEXT,                    -- redacted URL, DNS name, or host:port
    host TEXT, port INTEGER,
    status INTEGER,              -- HTTP status, DNS rcode
    bytes_out INTEGER,           -- guest -> internet (request body / upstream bytes)
    bytes_in INTEGER,            -- internet -> guest
    duration_ms REAL,
    decision TEXT,               -- allow | deny | error
    rule TEXT, reason TEXT
);
CREATE INDEX IF NOT EXISTS events_kernel ON events (kernel, id);
"""
MAX_TEXT = 4096
_FIELDS = frozenset(COLUMNS[3:])
BATCH_WINDOW = 0.25  # seconds the writer waits to gather rows into one transaction
IDLE_WAIT = 1.0      # longest a row can wait for the writer if its wake-up raced a drain
SECRET_KEYS = re.compile(r"(token|key|secret|passw|pwd|auth|sig|credential|session|cookie|code|jwt|bearer)",
                         re.IGNORECASE)


_NEEDS_PARSE = re.compile(r"[?#@\\\s]")


def default_db_path() -> Path:
    return paths.ensure_private_dir(paths.data_dir()) / DB_NAME


def redact_url(url: str, secrets: list[str] = ()) -> str:
    """Drop userinfo, blank secret-looking query values and any known secret value."""
    for s in secrets:
        if s:
            url = url.replace(s, "REDACTED")
    if url.isascii() and not _NEEDS_PARSE.search(url):
        return url[:MAX_TEXT]  # no userinfo, query or fragment: nothing to redact (most requests)
    try:
        parts = urlsplit(url)
    except ValueError:
        return url[:MAX_TEXT]
    netloc = parts.netloc.rsplit("@", 1)[-1]
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        query = "&".join(f"{quote(k, safe='')}={'REDACTED' if SECRET_KEYS.search(k) else quote(v, safe='')}"
                         for k, v in pairs)
    return urlunsplit((parts.scheme, netloc, parts.path, query, ""))[:MAX_TEXT]


def connect(db_path: Path | str) -> sqlite3.Connection:
    db_path = Path(db_path)
    paths.ensure_private_dir(db_path.parent)
    fd = os.open(db_path, os.O_RDWR | os.O_CREAT, 0o600)  # why: create private before sqlite does
    os.close(fd)
    con = sqlite3.connect(db_path, timeout=10, isolation_level=None, check_same_thread=False)
    con.execute("PRAGMA journal_mode=WAL")
    con.execute("PRAGMA synchronous=NORMAL")
    con.executescript(SCHEMA)
    return con


class AuditLog:
    """Thread-backed writer. `record()` is safe from any thread or event loop and never blocks.

    Why a deque and not a queue.Queue: a Queue takes a lock and notifies a condition per row, and
    a writer woken per row fights the event loop for the GIL on every request. Rows are appended
    (atomic under the GIL); the writer is woken only when the deque goes from empty to non-empty,
    then waits BATCH_WINDOW to gather one transaction. `flush()` and `close()` write everything
    recorded before them; rows past `max_queue` are counted and noted, never silently lost."""

    def __init__(self, db_path: Path | str | None = None, *, max_queue: int = 50_000):
        self.db_path = Path(db_path) if db_path else default_db_path()
        self.max_queue = max_queue
        self._rows: collections.deque = collections.deque()
        self._wake = threading.Event()
        self._urgent = False  # a flush or close is waiting: skip the batch window
        self._dropped = 0
        self._lock = threading.Lock()
        connect(self.db_path).close()  # fail early (and create the schema) in the caller
        self._thread = threading.Thread(target=self._run, name="capsem-audit", daemon=True)
        self._thread.start()

    def record(self, kernel: str, kind: str, **fields) -> None:
        ts = fields.pop("ts", None) or time.time()
        if not fields.keys() <= _FIELDS:
            raise TypeError(f"unknown audit field(s) {sorted(fields.keys() - _FIELDS)}")
        row = (ts, kernel, kind) + tuple(
            v[:MAX_TEXT] if isinstance(v := fields.get(c), str) else v for c in COLUMNS[3:])
        rows = self._rows
        if len(rows) >= self.max_queue:
            with self._lock:
                self._dropped += 1
            return
        empty = not rows
        rows.append(row)
        if empty:
            self._wake.set()

    def flush(self, timeout: float = 5.0) -> None:
        """Wait until everything recorded so far is written (tests, shutdown)."""
        if not self._thread.is_alive():
            return
        done = threading.Event()
        self._rows.append(done)
        self._urgent = True
        self._wake.set()
        done.wait(timeout)

    def close(self) -> None:
        self.flush()
        self._rows.append(None)
        self._urgent = True
        self._wake.set()
        self._thread.join(5)

    def _take(self) -> list:
        rows, out = self._rows, []
        for _ in range(len(rows)):
            out.append(rows.popleft())
        return out

    def _run(self) -> None:
        con = connect(self.db_path)
        sql = f"INSERT INTO events ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))})"
        while True:
            # the timeout only covers a row appended while the writer was draining (no wake-up)
            self._wake.wait(IDLE_WAIT)
            self._wake.clear()
            if not self._rows:
                continue
            if not self._urgent:
                time.sleep(BATCH_WINDOW)
            self._urgent = False
            batch, events, stop = [], [], False
            for item in self._take():
                if item is None:
                    stop = True
                elif isinstance(item, threading.Event):
                    events.append(item)
                else:
                    batch.append(item)
            with self._lock:
                dropped, self._dropped = self._dropped, 0
            if dropped:
                batch.append((time.time(), "-", "note", None, None, None, None, None, None, None, None,
                              "error", "audit-overflow", f"{dropped} audit rows dropped (queue full)"))
            for i in range(0, len(batch), 5000):
                self._write(con, sql, batch[i:i + 5000])
            for e in events:
                e.set()
            if stop:
                con.close()
                return

    @staticmethod
    def _write(con: sqlite3.Connection, sql: str, batch: list) -> None:
        for attempt in range(5):
            try:
                con.execute("BEGIN")
                con.executemany(sql, batch)
                con.execute("COMMIT")
                return
            except sqlite3.OperationalError:
                if con.in_transaction:
                    con.execute("ROLLBACK")
                time.sleep(0.1 * (attempt + 1))


def read_events(db_path: Path | str, *, kernel: str | None = None, after_id: int = 0,
                limit: int | None = None) -> list[dict]:
    """Rows with id > after_id, oldest first (or the newest `limit` when after_id is 0)."""
    db_path = Path(db_path)
    if not db_path.exists():
        return []
    con = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=10)
    con.row_factory = sqlite3.Row
    try:
        where, args = ["id > ?"], [after_id]
        if kernel:
            where.append("kernel = ?")
            args.append(kernel)
        sql = f"SELECT * FROM events WHERE {' AND '.join(where)}"
        if limit and not after_id:
            sql = f"SELECT * FROM ({sql} ORDER BY id DESC LIMIT {int(limit)}) ORDER BY id"
        else:
            sql += " ORDER BY id"
        try:
            return [dict(r) for r in con.execute(sql, args)]
        except sqlite3.OperationalError as exc:
            if "no such table" in str(exc):
                return []
            raise
    finally:
        con.close()
