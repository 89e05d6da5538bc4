"""Bounded-rate audit rows for what a guest can repeat at will (refusals, errors, DNS).

One mechanism for every writer (the bridge, the proxy addons, DNS, the control port): an
AuditLog hands each such row to a RefusalAggregator, keyed by (kernel, kind, code, rule, method,
url, host, port); the url carries the scheme, port and path where one was seen.

- The first row of a key is written at once, if the kernel's token bucket has a token
  (`rate` rows/s sustained, `burst` at most).
- Repeats of a key are counted; once `window` seconds have passed since the key's last row, the
  count is written as one row (`count`, `first_ts`, `last_ts`), which also costs a token. A key
  with no repeat in a window is forgotten (its next row is a first row again).
- What finds no token (or no free key slot, `max_keys` per process) is folded into one
  per-kernel row per window, code "audit-rate", whose reason counts the codes it holds.

Bound, per kernel and per writer process: rows <= burst + rate * t + t / window (the audit-rate
rows). Counts are never lost, only merged. Memory: at most max_keys entries plus one per kernel.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from ..rate import TokenBucket

RATE = 10.0       # itemised rows per second per kernel (sustained)
BURST = 50.0
WINDOW = 5.0      # seconds over which repeats are merged into one row
MAX_KEYS = 4096


@dataclass
class _Entry:
    row: dict                  # the fields of the key's first row (the template of its repeats)
    since: float               # when the key's last row was written
    count: int = 0             # repeats not yet written
    first_ts: float = 0.0
    last_ts: float = 0.0


@dataclass
class _Overflow:
    since: float
    count: int = 0
    first_ts: float = 0.0
    last_ts: float = 0.0
    codes: dict = field(default_factory=dict)


class RefusalAggregator:
    """Thread-safe: `offer` from any thread, `drain` from the writer."""

    def __init__(self, *, rate: float = RATE, burst: float = BURST, window: float = WINDOW,
                 max_keys: int = MAX_KEYS):
        self.rate, self.burst, self.window, self.max_keys = rate, burst, window, max_keys
        self._entries: dict[tuple, _Entry] = {}
        self._overflow: dict[str, _Overflow] = {}
        self._buckets: dict[str, TokenBucket] = {}
        self._lock = threading.Lock()

    @staticmethod
    def key(row: dict) -> tuple:
        return tuple(row.get(k) for k in ("kernel", "kind", "code", "rule", "method", "url", "host", "port"))

    def _token(self, kernel: str, now: float) -> bool:
        b = self._buckets.get(kernel)
        if b is None:
            b = self._buckets[kernel] = TokenBucket(self.rate, self.burst)
        return b.take(now)

    def _fold(self, row: dict, count: int, first_ts: float, last_ts: float, now: float) -> None:
        o = self._overflow.get(row["kernel"])
        if o is None:
            o = self._overflow[row["kernel"]] = _Overflow(now, first_ts=first_ts)
        o.count += count
        o.first_ts = min(o.first_ts, first_ts)
        o.last_ts = max(o.last_ts, last_ts)
        code = row.get("code") or "?"
        o.codes[code] = o.codes.get(code, 0) + count

    def offer(self, row: dict, now: float) -> dict | None:
        """The row to write now, or None if it was counted for a later row. `now`: monotonic;
        row["ts"] is the wall time of the event."""
        ts = row["ts"]
        k = self.key(row)
        with self._lock:
            e = self._entries.get(k)
            if e is not None:
                if e.count == 0:
                    e.first_ts = ts
                e.count += 1
                e.last_ts = ts
                return None
            if len(self._entries) < self.max_keys and self._token(row["kernel"], now):
                self._entries[k] = _Entry(row, now)
                return {**row, "count": 1, "first_ts": ts, "last_ts": ts}
            self._fold(row, 1, ts, ts, now)
            return None

    def drain(self, now: float, *, force: bool = False) -> list[dict]:
        """Rows whose window has passed (every pending count if `force`: a flush barrier)."""
        out = []
        with self._lock:
            for k, e in list(self._entries.items()):
                if not force and now - e.since < self.window:
                    continue
                if e.count == 0:
                    del self._entries[k]  # quiet for a window: forget it
                    continue
                if self._token(e.row["kernel"], now):
                    out.append({**e.row, "ts": e.first_ts, "count": e.count, "first_ts": e.first_ts,
                                "last_ts": e.last_ts})
                    e.count, e.since = 0, now
                else:
                    self._fold(e.row, e.count, e.first_ts, e.last_ts, now)
                    del self._entries[k]
            for kernel, o in list(self._overflow.items()):
                if not force and now - o.since < self.window:
                    continue
                del self._overflow[kernel]
                codes = ", ".join(f"{c} {n}" for c, n in sorted(o.codes.items(), key=lambda x: -x[1]))
                out.append({"ts": o.first_ts, "kernel": kernel, "kind": "note", "decision": "deny",
                            "code": "audit-rate", "rule": "audit-rate", "count": o.count,
                            "first_ts": o.first_ts, "last_ts": o.last_ts,
                            "reason": f"{o.count} refusals over the audit row rate, not itemised; "
                                      f"by code: {codes}"})
            for kernel, b in list(self._buckets.items()):  # full and idle buckets carry no state
                if b.full(now):
                    del self._buckets[kernel]
        return out

    @property
    def pending(self) -> int:
        with self._lock:
            return sum(e.count for e in self._entries.values()) + sum(o.count for o in self._overflow.values())
