"""Supervision of the proxy service's worker processes, for the service's owner (EgressRuntime).

A worker that dies (SIGKILL, a crash, the OOM killer) is noticed at once: its control pipe closes
and service.py calls `on_worker_exit`. The supervisor then replaces it (`ProxyService.
replace_worker`: a new process on a new port, every registered kernel registered with it again
with the policy and SOCKS credentials it had). Until then the bridges send new streams to the
other workers; with none left they refuse them with code `proxy-restarting`, audited (bridge.py).

A worker that stops answering without dying (SIGSTOPped, deadlocked, its loop starved) would still
accept connections that nobody serves. The supervisor pings every worker every PING_INTERVAL
seconds over its control pipe: the ping is answered on the worker's event loop, the same loop that
serves the proxy. A worker that does not answer within PING_TIMEOUT is SIGKILLed, and the death
path above replaces it.

Restarts back off (`RestartBackoff`, sans-IO): the first after a stable run is immediate, each
further one in a row waits twice as long as the last (0.5 s, 1 s, 2 s, ... at most 30 s), so a
worker that keeps dying never makes a tight restart loop. Every death and restart is logged;
`state()` is what the server extension shows (capsem_kernel/server/facts.py, via Egress.info).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

from .service import ProxyService

log = logging.getLogger(__name__)

REAP_TIMEOUT = 2.0  # a worker whose pipe closed but that is still running is killed by replace_worker
PING_INTERVAL = 5.0  # s between liveness pings of each worker
PING_TIMEOUT = 10.0  # s without an answer after which a worker counts as hung (generous: a loaded 2-core host)


@dataclass
class RestartBackoff:
    """Delays between restarts of one worker. `crashed(now)` when it dies (or a restart fails):
    the seconds to wait before the next start; `started(now)` once a start worked. A run of
    `stable_after` seconds or more ends the streak: the next crash restarts at once."""
    base: float = 0.5
    cap: float = 30.0
    stable_after: float = 30.0
    streak: int = 0                 # crashes in a row (failed starts included)
    started_at: float | None = None  # when the running process started; None: not running

    def crashed(self, now: float) -> float:
        if self.started_at is not None and now - self.started_at >= self.stable_after:
            self.streak = 0
        self.started_at = None
        self.streak += 1
        return restart_delay(self.streak, self.base, self.cap)

    def started(self, now: float) -> None:
        self.started_at = now


def restart_delay(streak: int, base: float = 0.5, cap: float = 30.0) -> float:
    """0 for the first crash of a streak, then base, 2 base, 4 base, ... at most cap."""
    return 0.0 if streak <= 1 else min(cap, base * 2.0 ** min(streak - 2, 64))


class ServiceSupervisor:
    """Keeps one ProxyService's workers up until stop(). Lives on the service's loop."""

    def __init__(self, service: ProxyService, *, clock=time.monotonic,
                 ping_interval: float = PING_INTERVAL, ping_timeout: float = PING_TIMEOUT):
        self.service = service
        self.clock = clock
        self.ping_interval, self.ping_timeout = ping_interval, ping_timeout
        self.hangs = 0  # workers killed because they stopped answering
        now = clock()
        self.backoffs = [RestartBackoff(started_at=now) for _ in service.workers]
        self.restarts = 0
        self.last_exit: dict | None = None
        self.last_error: str | None = None
        self.last_recovery_s: float | None = None
        self._tasks: dict[int, asyncio.Task] = {}
        self._next_start: dict[int, float] = {}  # worker index -> clock() of its next start
        service.on_worker_exit = self._worker_exited
        for index, worker in enumerate(service.workers):
            if not worker.alive:  # died between its start and now, when nobody listened
                self._worker_exited(index, worker)
        self._watchdog = asyncio.get_running_loop().create_task(self._watch())

    async def _watch(self) -> None:
        """Ping every serving worker each interval; SIGKILL one that does not answer in time."""
        while self.service.supervised:
            await asyncio.sleep(self.ping_interval)
            workers = [(i, w) for i, w in enumerate(self.service.workers)
                       if i not in self._tasks and w.alive and w.serving]
            await asyncio.gather(*(self._ping(i, w) for i, w in workers))

    async def _ping(self, index: int, worker) -> None:
        try:
            await worker.request({"t": "ping"}, timeout=self.ping_timeout)
        except asyncio.TimeoutError:
            proc = worker.proc
            if proc is None or proc.returncode is not None or not self.service.supervised:
                return
            self.hangs += 1
            self.last_error = f"worker {index} (pid {proc.pid}) did not answer a ping in {self.ping_timeout:.0f} s"
            log.error("proxy service %s: killing it (stopped, deadlocked or starved); it is replaced like "
                      "a dead one", self.last_error)
            proc.kill()  # its pipe closes: _worker_exited restarts it
        except Exception:  # noqa: BLE001 - gone or answered with an error: alive, or the exit path handles it
            pass

    def _worker_exited(self, index: int, worker) -> None:
        if index not in self._tasks:  # a death during its own restart: that task handles it
            self._tasks[index] = asyncio.get_running_loop().create_task(self._restart(index, worker))

    async def _restart(self, index: int, worker) -> None:
        died = self.clock()
        returncode = None
        if worker.proc is not None:
            try:
                returncode = await asyncio.wait_for(worker.proc.wait(), REAP_TIMEOUT)
            except asyncio.TimeoutError:
                pass
        self.last_exit = {"worker": index, "pid": worker.proc.pid if worker.proc else None,
                          "returncode": returncode, "at": time.time()}
        what = f"proxy service worker {index} (pid {self.last_exit['pid']}, exit {returncode})"
        try:
            while self.service.supervised:
                delay = self.backoffs[index].crashed(self.clock())
                log.warning("%s died: restarting it %s (%d in a row); egress that needs it is refused meanwhile "
                            "(proxy-restarting)", what, f"in {delay:.1f} s" if delay else "now",
                            self.backoffs[index].streak)
                self._next_start[index] = self.clock() + delay
                await asyncio.sleep(delay)
                try:
                    await self.service.replace_worker(index)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # noqa: BLE001 - any failure to start counts as a crash
                    self.last_error = f"{exc.__class__.__name__}: {exc}"
                    log.error("restarting %s failed: %s", what, self.last_error)
                    what = f"proxy service worker {index} (its restart)"
                    continue
                if not self.service.workers[index].serving:  # died again while being registered
                    what = f"proxy service worker {index} (just restarted)"
                    continue
                self.backoffs[index].started(self.clock())
                self.restarts += 1
                self.last_error = None
                self.last_recovery_s = self.clock() - died
                log.warning("proxy service worker %d restarted in %.2f s (pid %s); every kernel registered again",
                            index, self.last_recovery_s, self.service.workers[index].proc.pid)
                return
        finally:
            self._next_start.pop(index, None)
            self._tasks.pop(index, None)

    def state(self) -> dict:
        """running | restarting (a start under way) | backoff (waiting before the next start),
        with the figures behind it. Plain reads: safe to call from another thread."""
        now = self.clock()
        waits = [t - now for t in list(self._next_start.values()) if t > now]
        pending = len(self._tasks)
        return {
            "state": "backoff" if waits else "restarting" if pending else "running",
            "workers": len(self.service.workers),
            "serving": len(self.service.serving_ports()),
            "restarts": self.restarts,
            "crashes_in_a_row": max((b.streak for b in self.backoffs if b.started_at is None), default=0),
            "next_restart_in": round(min(waits), 3) if waits else None,
            "last_exit": dict(self.last_exit) if self.last_exit else None,
            "last_recovery_s": self.last_recovery_s,
            "last_error": self.last_error,
            "hangs": self.hangs,
        }

    async def stop(self) -> None:
        """No more restarts (call before closing the service)."""
        self.service.on_worker_exit = None
        # not awaited: the watchdog only sleeps or waits on a ping, and the service's close must
        # follow at once (a stopping runtime reports its service gone without a loop turn between)
        self._watchdog.cancel()
        tasks = list(self._tasks.values())
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
