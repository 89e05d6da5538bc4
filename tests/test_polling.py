"""capsem_vm.polling: the one poll-until loop (sync on a fake clock, async on a real loop)."""
import asyncio

import pytest
from hypothesis import given, strategies as st

from capsem_vm.errors import VMError
from capsem_vm.polling import PollTimeout, poll_until, poll_until_async


class FakeTime:
    def __init__(self):
        self.now = 0.0
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def _after(n: int, value="done"):
    """A predicate that is falsy for its first n calls, then returns value."""
    calls = []

    def predicate():
        calls.append(1)
        return value if len(calls) > n else None
    return predicate, calls


@given(falsy=st.integers(0, 50), interval=st.sampled_from([0.01, 0.1, 0.25, 1.0]),
       timeout=st.sampled_from([0.0, 0.5, 1.0, 3.0, 10.0]))
def test_returns_the_first_truthy_value_or_times_out_after_the_deadline(falsy, interval, timeout):
    t = FakeTime()
    predicate, calls = _after(falsy)
    try:
        got = poll_until(predicate, what="the thing", timeout=timeout, interval=interval,
                         clock=t.clock, sleep=t.sleep)
    except PollTimeout as exc:
        # gave up only once past the deadline, and only after a last look at the predicate
        assert t.now > timeout
        assert t.now - interval <= timeout
        assert len(calls) <= falsy
        assert exc.what == "the thing" and exc.timeout == timeout
        assert str(exc) == f"timed out after {timeout:g} s waiting for the thing"
        assert isinstance(exc, TimeoutError)
    else:
        assert got == "done"
        assert len(calls) == falsy + 1          # called until it held, not once more
        assert t.sleeps == [interval] * falsy   # one sleep between two calls, none after success
        assert t.now - interval <= timeout      # every call it needed came before the deadline


def test_a_condition_that_already_holds_costs_no_sleep():
    t = FakeTime()
    assert poll_until(lambda: 7, what="x", timeout=0, interval=5, clock=t.clock, sleep=t.sleep) == 7
    assert t.sleeps == []


def test_no_timeout_waits_as_long_as_it_takes():
    t = FakeTime()
    predicate, calls = _after(10_000)
    assert poll_until(predicate, what="x", timeout=None, interval=60, clock=t.clock, sleep=t.sleep) == "done"
    assert len(calls) == 10_001


def test_the_caller_chooses_the_error_and_a_raising_predicate_gives_up_early():
    t = FakeTime()
    with pytest.raises(VMError, match="^timed out after 2 s waiting for the pool service$"):
        poll_until(lambda: False, what="the pool service", timeout=2, interval=0.5, error=VMError,
                   clock=t.clock, sleep=t.sleep)

    def died():
        raise VMError("it exited with code 3")
    with pytest.raises(VMError, match="code 3"):
        poll_until(died, what="x", timeout=10, interval=1, clock=t.clock, sleep=t.sleep)


def test_async_awaits_coroutine_predicates_and_times_out_by_the_loop_clock():
    async def main():
        n = 0

        async def ready():
            nonlocal n
            n += 1
            return n >= 3 and {"state": "ready"}
        assert await poll_until_async(ready, what="x", timeout=5, interval=0.001) == {"state": "ready"}
        assert n == 3
        assert await poll_until_async(lambda: "sync ok", what="x", timeout=0, interval=1) == "sync ok"
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        with pytest.raises(PollTimeout, match="waiting for the backend socket") as info:
            await poll_until_async(lambda: None, what="the backend socket", timeout=0.05, interval=0.01)
        assert loop.time() - t0 >= 0.05
        assert info.value.timeout == 0.05
        with pytest.raises(OSError, match="custom"):
            await poll_until_async(lambda: 0, what="x", timeout=0, interval=0.01, error=lambda m: OSError(f"custom {m}"))
    asyncio.run(main())
