"""The audit log: one SQLite table in capsem_vm.paths.data_dir(), written by the proxy service
(connections, HTTP, WebSocket, TCP) and by each VM's egress bridge (DNS, refused streams).
The contract readers rely on (columns, codes, counts, the barrier, the cap) is docs/AUDIT.md.

Writers never block the event loop: rows go through a bounded deque to one writer thread that
batches inserts (WAL mode, so several processes and `capsem audit --follow` can share the file).
If the queue overflows, rows are dropped and a row saying how many is written instead.
Secrets never reach this module unredacted: URLs pass through `redact_url`. Guest text is
escaped here, once, for every writer (capsem_vm.safetext.escape).

What a guest can repeat at will (refusals, errors, DNS answers) goes through one
RefusalAggregator (audit_rate.py): bounded rows per second per kernel, with counts.
If the database cannot be written (disk full, read-only, locked), rows stay in memory (bounded)
and `available` turns False: the bridge and the proxy addons then refuse new egress with code
"audit-unavailable" until a write works again.
"""

from __future__ import annotations

import collections
import os
import re
import sqlite3
import sys
import threading
import time
from pathlib import Path
from urllib.parse import parse_qsl, quote, urlsplit, urlunsplit

from .. import paths
from ..policy import codes as reason_codes
from ..safetext import escape
from .audit_rate import RefusalAggregator

DB_NAME = "audit.sqlite3"
COLUMNS = ("ts", "kernel", "kind", "method", "url", "host", "port", "status", "bytes_out", "bytes_in",
           "duration_ms", "decision", "rule", "reason", "code", "count", "first_ts", "last_ts", "node")
SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY,
    ts REAL NOT NULL,            -- unix time the event started (the first one of an aggregated row)
    kernel TEXT NOT NULL,        -- kernel id (who)
    kind TEXT NOT NULL,          -- dns | connect | http | websocket | tcp | note | policy (a reload)
    method TEXT,                 -- HTTP method, DNS query type
    url TEXT,                    -- redacted URL, DNS name, or host:port
    host TEXT, port INTEGER,
    status INTEGER,              -- HTTP status, DNS rcode
    bytes_out INTEGER,           -- guest -> internet (request body / upstream bytes)
    bytes_in INTEGER,            -- internet -> guest
    duration_ms REAL,
    decision TEXT,               -- allow | deny | error | would-deny (observe mode) | change (kind policy)
    rule TEXT, reason TEXT,
    code TEXT,                   -- stable reason code (capsem_vm/policy/codes.py)
    count INTEGER NOT NULL DEFAULT 1,  -- events this row stands for (aggregated repeats)
    first_ts REAL, last_ts REAL, -- first and last of them (unix time)
    node TEXT NOT NULL DEFAULT '' -- the host that wrote it ('' = this one)
);
CREATE INDEX IF NOT EXISTS events_kernel ON events (kernel, id);
"""
# added after the first release: ALTER TABLE adds them to existing databases (rows kept)
MIGRATIONS = (("code", "TEXT"), ("count", "INTEGER NOT NULL DEFAULT 1"), ("first_ts", "REAL"),
              ("last_ts", "REAL"), ("node", "TEXT NOT NULL DEFAULT ''"))
MAX_TEXT = 4096
_FIELDS = frozenset(COLUMNS[3:]) - {"node"}
BATCH_WINDOW = 0.25  # seconds the writer waits to gather rows into one transaction
IDLE_WAIT = 1.0      # longest a row can wait for the writer if its wake-up raced a drain
RETRY_WAIT = 1.0     # after a failed write, the next try
MAX_BYTES = 256 << 20  # default size cap per database (CAPSEM_AUDIT_MAX_MB)
LOW_WATER = 0.9      # rotation deletes the oldest rows down to this share of the cap
CHUNK = 1000         # rows per write transaction (and per size check)
BUSY_TIMEOUT = 2.0   # a write waits this long for another process's lock, then counts as failed
SECRET_KEYS = re.compile(r"(token|key|secret|passw|pwd|auth|sig|credential|session|cookie|code|jwt|bearer)",
                         re.IGNORECASE)
# every row of these kinds is rate-bounded, allows too: a DNS answer and a connection's admission
# say nothing a repeat adds to (what leaves is in the per-request http/websocket/tcp rows), and a
# guest can repeat both at will (a new connection per denied request, say)
AGGREGATED_KINDS = frozenset({"dns", "connect"})


_NEEDS_PARSE = re.compile(r"[?#@\\\s]")


def default_db_path() -> Path:
    return paths.ensure_private_dir(paths.data_dir()) / DB_NAME


def default_max_bytes() -> int:
    try:
        return int(float(os.environ["CAPSEM_AUDIT_MAX_MB"]) * (1 << 20))
    except (KeyError, ValueError):
        return MAX_BYTES


def default_node() -> str:
    return os.environ.get("CAPSEM_NODE", "")


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
        # surrogateescape both ways: query bytes that are not UTF-8 (mitmproxy hands them over as
        # lone surrogates, escaped or raw) come back out as the same %XX, and nothing here raises
        # (a raise would lose the row of a request that already went out)
        pairs = parse_qsl(query, keep_blank_values=True, errors="surrogateescape")
        query = "&".join(f"{_quote(k)}={'REDACTED' if SECRET_KEYS.search(k) else _quote(v)}" for k, v in pairs)
    return urlunsplit((parts.scheme, netloc, parts.path, query, ""))[:MAX_TEXT]


def _quote(text: str) -> str:
    try:
        data = text.encode("utf-8", "surrogateescape")  # U+DC80-U+DCFF: the byte it stood for
    except UnicodeEncodeError:
        data = text.encode("utf-8", "surrogatepass")    # any other lone surrogate: its own bytes
    return quote(data, safe="")


def migrate(con: sqlite3.Connection) -> None:
    """Add the columns an older database lacks (several processes may race: a duplicate is fine)."""
    have = {r[1] for r in con.execute("PRAGMA table_info(events)")}
    for name, decl in MIGRATIONS:
        if name not in have:
            try:
                con.execute(f"ALTER TABLE events ADD COLUMN {name} {decl}")
            except sqlite3.OperationalError as exc:
                if "duplicate column" not in str(exc):
                    raise


def connect(db_path: Path | str, *, timeout: float = 10) -> sqlite3.Connection:
    db_path = Path(db_path)
    paths.ensure_private_dir(db_path.parent)
    fd = os.open(db_path, os.O_RDWR | os.O_CREAT, 0o600)  # why: create private before sqlite does
    os.close(fd)
    con = sqlite3.connect(db_path, timeout=timeout, isolation_level=None, check_same_thread=False)
    try:
        con.execute("PRAGMA journal_mode=WAL")
        con.execute("PRAGMA synchronous=NORMAL")
        con.execute("PRAGMA journal_size_limit=33554432")  # the WAL shrinks back to 32 MiB after a checkpoint
        con.executescript(SCHEMA)
        migrate(con)
    except BaseException:
        con.close()
        raise
    return con


def unwritable_hint(exc: BaseException, db_path: Path) -> str:
    """What to do about a database write that failed with `exc` (for the log line saying so)."""
    text = str(exc).lower()
    errno_ = getattr(exc, "errno", None)
    if "full" in text or errno_ in (28, 122):  # ENOSPC, EDQUOT; sqlite: "database or disk is full"
        return (f"the file system of {db_path.parent} is full: free space there (the log resumes by itself), "
                "or move the data dir with CAPSEM_DATA_DIR")
    if "locked" in text or "busy" in text:
        return (f"another process has held the database's write lock for over {BUSY_TIMEOUT:g} s: end it "
                f"(`fuser {db_path}` names it); the log resumes by itself")
    if "readonly" in text or "read-only" in text or errno_ in (13, 30):  # EACCES, EROFS
        return f"{db_path} is read-only here: make it writable, or move the data dir with CAPSEM_DATA_DIR"
    return f"check {db_path} and its file system; the log resumes by itself once a write works"


def prepare(db_path: Path | str) -> str | None:
    """Create the database (WAL mode, schema) ahead of its writers. A database that cannot be written
    now (full, locked, read-only) is not an error here: returns why, and each AuditLog starts
    unavailable (egress refused) and retries, as when the trouble begins mid-session."""
    try:
        connect(db_path, timeout=BUSY_TIMEOUT).close()
    except (sqlite3.Error, OSError) as exc:
        return f"{exc.__class__.__name__}: {exc}"
    return None


def default_code(decision: str | None, rule: str | None) -> str:
    """The code of a row whose writer named none: the rule's own name if it is a code."""
    if rule and reason_codes.known(rule):
        return rule
    return {"allow": "rule-allow", "deny": "rule-deny"}.get(decision or "", "error")


class AuditLog:
    """Thread-backed writer. `record()` is safe from any thread or event loop and never blocks.

    Why a deque and not a queue.Queue: a Queue takes a lock and notifies a condition per row, and
    a writer woken per row fights the event loop for the GIL on every request. Rows are appended
    (atomic under the GIL); the writer is woken only when the deque goes from empty to non-empty,
    then waits BATCH_WINDOW to gather one transaction. `flush()` and `close()` write everything
    recorded before them; rows past `max_queue` are counted and noted, never silently lost."""

    def __init__(self, db_path: Path | str | None = None, *, max_queue: int = 50_000,
                 max_bytes: int | None = None, node: str | None = None,
                 aggregator: RefusalAggregator | None = None):
        self.db_path = Path(db_path) if db_path else default_db_path()
        self.max_queue = max_queue
        self.max_bytes = max_bytes if max_bytes is not None else default_max_bytes()
        self.node = escape(node if node is not None else default_node())[:200]
        self.aggregator = aggregator if aggregator is not None else RefusalAggregator()
        self._rows: collections.deque = collections.deque()
        self._wake = threading.Event()
        self._urgent = False  # a flush or close is waiting: skip the batch window
        self._dropped = 0
        self._lock = threading.Lock()
        self._unwritten = 0   # rows the writer holds after a failed write
        self._writable = True  # False while the database cannot be written (see `available`)
        self.last_error: str | None = None
        self.rotations = 0
        try:  # create the schema now, in the caller, and say at once when it cannot be done
            connect(self.db_path, timeout=BUSY_TIMEOUT).close()
        except (sqlite3.Error, OSError) as exc:
            # why not raise: a full or locked database at start is the same trouble as one mid-session
            # (egress refused with audit-unavailable until a write works, the writer retrying), not a
            # dead proxy worker restarted in a loop or a kernel that cannot start even offline
            self._failed(exc)
            self._append(self._note("audit-unavailable", "the audit database could not be written when "
                                    f"this writer started ({self.last_error}): egress was refused until now"))
        self._thread = threading.Thread(target=self._run, name="capsem-audit", daemon=True)
        self._thread.start()

    @property
    def available(self) -> bool:
        """False while rows could not be kept: the database cannot be written, or the queue is full
        (the writer stalled on a slow disk). Egress is then refused (bridge, proxy addons), never
        sent with its row dropped."""
        return self._writable and len(self._rows) < self.max_queue

    def record(self, kernel: str, kind: str, **fields) -> None:
        ts = fields.pop("ts", None) or time.time()
        if not fields.keys() <= _FIELDS:
            raise TypeError(f"unknown audit field(s) {sorted(fields.keys() - _FIELDS)}")
        if not fields.get("code"):
            fields["code"] = default_code(fields.get("decision"), fields.get("rule"))
        if kind in AGGREGATED_KINDS or fields.get("decision") not in (None, "allow"):
            row = {k: (escape(v[:MAX_TEXT]) if isinstance(v, str) else v) for k, v in fields.items()}
            row.update(ts=ts, kernel=escape(kernel[:MAX_TEXT]), kind=kind)
            row = self.aggregator.offer(row, time.monotonic())
            if row is None:
                return  # counted: written later as part of one row with a count
            self._append(tuple(row.get(c) for c in COLUMNS[:-1]) + (self.node,))
            return
        self._append((ts, escape(kernel[:MAX_TEXT]), kind) + tuple(
            escape(v[:MAX_TEXT]) if isinstance(v := fields.get(c), str) else v for c in COLUMNS[3:15])
            + (1, ts, ts, self.node))

    def _append(self, row: tuple) -> None:
        rows = self._rows
        if len(rows) >= self.max_queue:
            with self._lock:
                self._dropped += 1
            return
        empty = not rows
        rows.append(row)
        if empty:
            self._wake.set()

    def flush(self, timeout: float = 5.0) -> bool:
        """The barrier: wait until every row recorded before this call is written, pending counts
        of aggregated refusals included. False if that could not be done (the database cannot be
        written, or the timeout passed)."""
        if not self._thread.is_alive():
            return False
        done = threading.Event()
        self._rows.append(done)
        self._urgent = True
        self._wake.set()
        return done.wait(timeout) and self._unwritten == 0

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

    def _note(self, code: str, reason: str, count: int = 1) -> tuple:
        now = time.time()
        return (now, "-", "note", None, None, None, None, None, None, None, None, "error", code, reason,
                code, count, now, now, self.node)

    def _run(self) -> None:
        con: sqlite3.Connection | None = None
        held: list[tuple] = []  # rows not written yet (a write failed): retried, bounded by max_queue
        sql = f"INSERT INTO events ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))})"
        while True:
            # the timeout only covers a row appended while the writer was draining (no wake-up),
            # the aggregator's windows, and retries after a failed write
            self._wake.wait(RETRY_WAIT if held else IDLE_WAIT)
            self._wake.clear()
            if self._rows and not self._urgent and not held:
                time.sleep(BATCH_WINDOW)
            self._urgent = False
            events, stop = [], False
            for item in self._take():
                if item is None:
                    stop = True
                elif isinstance(item, threading.Event):
                    events.append(item)
                else:
                    held.append(item)
            held.extend(tuple(r.get(c) for c in COLUMNS[:-1]) + (self.node,)
                        for r in self.aggregator.drain(time.monotonic(), force=bool(events) or stop))
            if len(held) > self.max_queue:  # the database has been failing for a while
                with self._lock:
                    self._dropped += len(held) - self.max_queue
                del held[:len(held) - self.max_queue]
            with self._lock:
                dropped, self._dropped = self._dropped, 0
            if dropped:
                held.append(self._note("audit-overflow", f"{dropped} audit rows dropped (queue full)", dropped))
            if held:
                if con is None:
                    con = self._open()
                if con is not None and self._write(con, sql, held):
                    held = []
            self._unwritten = len(held)
            for e in events:
                e.set()
            if stop:
                if con is not None:
                    con.close()
                return

    def _open(self) -> sqlite3.Connection | None:
        try:
            return connect(self.db_path, timeout=BUSY_TIMEOUT)
        except (sqlite3.Error, OSError) as exc:
            self._failed(exc)
            return None

    def _write(self, con: sqlite3.Connection, sql: str, batch: list) -> bool:
        committed = 0
        try:
            for i in range(0, len(batch), CHUNK):
                con.execute("BEGIN IMMEDIATE")
                con.executemany(sql, batch[i:i + CHUNK])
                con.execute("COMMIT")
                committed = min(i + CHUNK, len(batch))
                self._rotate(con)  # per chunk: the database exceeds its cap by at most one chunk
        except (sqlite3.Error, OSError) as exc:
            try:
                if con.in_transaction:
                    con.execute("ROLLBACK")
            except sqlite3.Error:
                pass
            # why: rows of committed chunks must not be written twice (a rotation can fail after
            # its chunk's COMMIT)
            del batch[:committed]
            self._failed(exc)
            return False
        if not self._writable:
            self._writable = True
            print(f"capsem audit: writing {self.db_path} works again; egress is allowed again",
                  file=sys.stderr, flush=True)
        return True

    def _failed(self, exc: BaseException) -> None:
        self.last_error = f"{exc.__class__.__name__}: {exc}"
        if self._writable:
            self._writable = False
            print(f"capsem audit: cannot write {self.db_path} ({self.last_error}): new egress is refused "
                  f"(code audit-unavailable) until it can\n  hint: {unwritable_hint(exc, self.db_path)}",
                  file=sys.stderr, flush=True)

    def _rotate(self, con: sqlite3.Connection) -> None:
        """Keep the database's used pages under max_bytes: delete the oldest rows (freed pages are
        reused, so the file stops growing) and say so in a row. Safe with several writer
        processes: the check is repeated inside a write transaction."""
        def used() -> int:
            page = con.execute("PRAGMA page_size").fetchone()[0]
            return (con.execute("PRAGMA page_count").fetchone()[0]
                    - con.execute("PRAGMA freelist_count").fetchone()[0]) * page
        try:
            if used() <= self.max_bytes:
                return
            con.execute("BEGIN IMMEDIATE")
            size = used()
            lo, hi = con.execute("SELECT MIN(id), MAX(id) FROM events").fetchone()
            if size <= self.max_bytes or lo is None:
                con.execute("ROLLBACK")
                return
            cut = lo + max(1, int((hi - lo + 1) * (1 - LOW_WATER * self.max_bytes / size)))
            n = con.execute("DELETE FROM events WHERE id < ?", (cut,)).rowcount
            con.execute(f"INSERT INTO events ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))})",
                        self._note("audit-rotated",
                                   f"size cap {self.max_bytes >> 20} MiB reached: the {n} oldest rows "
                                   f"(ids {lo}..{cut - 1}) were deleted", n))
            con.execute("COMMIT")
            self.rotations += 1
        except sqlite3.Error as exc:
            try:
                if con.in_transaction:
                    con.execute("ROLLBACK")
            except sqlite3.Error:
                pass
            self._failed(exc)


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
