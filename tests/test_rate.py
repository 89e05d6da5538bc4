"""capsem_vm/rate.py: the one token bucket (DNS, audit rows, channel bytes) and the one report
throttle (audit-unavailable log lines), pure: the clock is an argument."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from capsem_vm.rate import TokenBucket, Throttle

steps = st.lists(st.tuples(st.floats(0, 2, allow_nan=False), st.integers(1, 50)), max_size=60)


@settings(max_examples=300)
@given(st.floats(0.5, 100), st.floats(1, 100), steps)
def test_take_admits_at_most_burst_plus_rate_times_elapsed(rate, burst, events):
    b, now, taken = TokenBucket(rate, burst), 0.0, 0
    for dt, n in events:
        now += dt
        if b.take(now, n):
            taken += n
        assert 0 <= b.tokens <= burst
    assert taken <= burst + rate * now + 1e-6


@settings(max_examples=300)
@given(st.floats(0.5, 100), st.floats(1, 100), steps)
def test_a_debtor_that_waits_what_debit_says_keeps_the_rate(rate, burst, events):
    b, now, sent = TokenBucket(rate, burst), 0.0, 0
    for dt, n in events:
        now += dt
        sent += n
        now += b.debit(now, n)  # the caller sleeps that long before sending more
        assert sent <= burst + rate * now + 1e-6
        assert b.debit(now, 0) <= 1e-9  # the debt is paid once the wait is over


def test_take_is_all_or_nothing_and_refills_to_burst():
    b = TokenBucket(10, 5)
    assert b.full(0.0)
    assert b.take(0.0, 5) and not b.take(0.0) and b.tokens == 0
    assert not b.full(0.1) and b.full(0.5)
    assert b.take(0.3, 3) and not b.take(0.3, 1)  # 3 tokens back after 0.3 s, all taken
    assert b.take(10.0, 5) and not b.take(10.0, 1)  # never more than burst held


def test_debit_returns_the_wait_that_pays_the_debt():
    b = TokenBucket(100, 10)
    assert b.debit(0.0, 10) == 0.0
    assert abs(b.debit(0.0, 50) - 0.5) < 1e-9
    assert abs(b.debit(0.5, 0)) < 1e-9  # paid after waiting


@settings(max_examples=300)
@given(st.lists(st.floats(0, 3, allow_nan=False), max_size=100), st.floats(0.1, 2))
def test_throttle_reports_every_event_once_at_most_once_per_interval(gaps, interval):
    t, now, reported, last = Throttle(interval), 1000.0, 0, None
    for gap in gaps:
        now += gap
        n = t.count(now)
        if n:
            assert last is None or now - last >= interval
            last = now
            reported += n
    assert reported + t.held == len(gaps)
    if gaps:
        assert reported >= 1  # the first event is always reported at once
