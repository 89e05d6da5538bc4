"""Rate bounds, sans-IO (the caller passes the clock, `time.monotonic()` seconds).

    TokenBucket  `rate` tokens a second, at most `burst` held: DNS queries and audit rows of one
                 kernel (proxy/dns_responder.py, proxy/audit_rate.py), channel bytes from one
                 guest kernel (capsem_kernel/channels.py)
    Throttle     at most one report per interval, counting what it held back: the log lines for
                 egress refused while the audit log cannot be written (proxy/bridge.py,
                 proxy/addons/audit.py)
"""

from __future__ import annotations


class TokenBucket:
    """Starts full. `take` for all-or-nothing admission, `debit` for a caller that waits."""

    def __init__(self, rate: float, burst: float):
        self.rate, self.burst = float(rate), float(burst)
        self.tokens = self.burst
        self.stamp: float | None = None  # when tokens was last brought up to date

    def _refill(self, now: float) -> None:
        if self.stamp is not None:
            self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now

    def take(self, now: float, n: float = 1.0) -> bool:
        """Take n tokens if the bucket holds them, else take nothing."""
        self._refill(now)
        if self.tokens >= n:
            self.tokens -= n
            return True
        return False

    def debit(self, now: float, n: float) -> float:
        """Take n tokens, into debt if need be; the seconds until the debt is paid (0.0 if there
        is none). A caller that waits that long before going on keeps to the rate."""
        self._refill(now)
        self.tokens -= n
        return -self.tokens / self.rate if self.tokens < 0 else 0.0

    def full(self, now: float) -> bool:
        """It holds `burst` tokens by `now`: it carries no state worth keeping."""
        return self.stamp is None or self.tokens + (now - self.stamp) * self.rate >= self.burst


class Throttle:
    """Events reported at most once per `interval` s: `count(now)` counts one and returns how
    many to report now (it and those held back since the last report), or 0 to stay quiet."""

    def __init__(self, interval: float = 1.0):
        self.interval = interval
        self.held = 0
        self._reported: float | None = None

    def count(self, now: float) -> int:
        self.held += 1
        if self._reported is not None and now - self._reported < self.interval:
            return 0
        n, self.held, self._reported = self.held, 0, now
        return n
