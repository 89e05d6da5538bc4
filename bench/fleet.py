"""Start N kernels (or sandboxes) at once, run a cell in each, and watch the host meanwhile.

Reusable by any bench that starts many things together (bench/many.py: capsem kernels from a pool
and cold; bench/ray.py: sandboxes on Ray nodes). Import it with bench/ on sys.path
(`sys.path.insert(0, str(Path(__file__).parent))`, then `import fleet`).

    import fleet
    def start(marks: fleet.Marks):         # one callable per kernel
        ...start it...;  marks.mark("ready")  # seconds since the common release
        ...run a cell, check its output...; marks.mark("cell")
        marks.info["group"] = "pooled"      # medians are given per group (default "all")
        return lambda: ...stop it...        # called after all are done (None: nothing to stop)
    result = fleet.run_fleet([start] * 20, pids=fleet.tree_pids)
    print(fleet.format_summary("my kernels", result.summary()))

run_fleet(starts, *, pids=None, sample_s=1.0, tick_s=0.01, settle_s=0.0, stop=True, timeout=None)
  - starts: callables, each run on its own thread; all threads are released together by a barrier
    (the common t0). A callable records its milestones with marks.mark(name) and returns a stop
    callable. An exception is that kernel's error (result.kernels[i]["error"]); the others go on.
  - pids: a callable returning the pids whose memory counts (called at each sample, so processes
    that appear later count); default tree_pids() = this process and all its descendants.
  - the host watch, from before the release until all callables returned (+ settle_s, idle):
      * a timer loop in a separate process (so this process's GIL does not bias it) sleeps tick_s
        repeatedly; its lateness (actual - tick_s) gives worst, p99 and p50 in ms;
      * every sample_s: PSS (/proc/PID/smaps_rollup) summed over pids(), by process kind (kind_of:
        qemu, vsock, virtiofsd, keeper, proxy, pool, ipykernel, this process, other); the peak sum
        and the kinds at that peak; MemAvailable (/proc/meminfo), its low-water mark; and this
        process's open descriptors (peak_fds: kernel managers and relays live here).
  - stop=True: the stop callables run afterwards, all at once on threads (timed: stop_s).
  Returns a FleetResult: kernels (per kernel: marks, info, error), all_s (release -> last callable
  returned), watch (samples, lateness, memory); .summary() gives the figures as one dict:
  ok/n, time to all `ready` and all `cell`, per-group medians of each mark, lateness, peak PSS,
  MemAvailable low-water, peak_fds. format_summary(label, summary) prints it.

jupyter_start(kernel_name, config, cwd, code, check) makes a start callable for a jupyter_client
kernel, the way its users start one: KernelManager.start_kernel, start_channels, wait_for_ready
(mark "ready"), execute `code` (mark "cell"), check(outputs) must return True.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

Stop = Callable[[], None]


class Marks:
    """A kernel's milestones, in seconds since the fleet's common release (t0)."""

    def __init__(self, index: int, t0: float):
        self.index = index
        self.t0 = t0
        self.times: dict[str, float] = {}
        self.info: dict[str, Any] = {}

    def mark(self, name: str) -> float:
        t = time.perf_counter() - self.t0
        self.times[name] = t
        return t


@dataclass
class FleetResult:
    kernels: list[dict]
    all_s: float
    watch: dict
    stop_s: float | None = None
    extra: dict = field(default_factory=dict)

    def summary(self) -> dict:
        return summarize(self)


# --- processes and memory ------------------------------------------------------------------

def children_map() -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        out.setdefault(ppid, []).append(int(entry.name))
    return out


def descendants(roots: Iterable[int], children: dict[int, list[int]] | None = None) -> list[int]:
    """The roots' children, grandchildren, ... (roots not included)."""
    children = children_map() if children is None else children
    out, todo = [], list(roots)
    while todo:
        for c in children.get(todo.pop(), ()):
            out.append(c)
            todo.append(c)
    return out


def tree_pids(*extra_roots: int) -> list[int]:
    """This process, its descendants, and each extra root with its descendants."""
    roots = [os.getpid(), *extra_roots]
    return roots + descendants(roots)


def pss_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def mem_available_kb() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1])
    return 0


def kind_of(pid: int) -> str:
    """A process's kind, from its command line (QEMU's -name and the vsock backend's argv[0] carry
    the VM dir; the pooled VM's keeper, the proxy service and the pool service are Python modules)."""
    if pid == os.getpid():
        return "this process"
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return "other"
    text = b" ".join(argv).decode(errors="replace")
    prog = os.path.basename(argv[0].decode(errors="replace")) if argv and argv[0] else ""
    if prog.startswith("qemu-system"):
        return "qemu"
    if "vhost-device-vsock" in text or prog.startswith("vsock"):
        return "vsock"
    if "virtiofsd" in text or "idmap_share" in text:
        return "virtiofsd"
    if "capsem_vm.pool.keeper" in text:
        return "keeper"
    if "capsem_vm.proxy" in text or "mitmproxy" in text:
        return "proxy"
    if "pool start" in text:
        return "pool"
    if "ipykernel" in text:
        return "ipykernel"
    if prog in ("unshare", "setpriv"):
        return "wrapper"
    return "other"


def memory_sample(pids: Iterable[int]) -> dict:
    by_kind: dict[str, float] = {}
    count: dict[str, int] = {}
    for pid in set(pids):
        kb = pss_kb(pid)
        if not kb:
            continue
        k = kind_of(pid)
        by_kind[k] = by_kind.get(k, 0) + kb / 1024
        count[k] = count.get(k, 0) + 1
    return {"pss_mb": round(sum(by_kind.values()), 1), "by_kind_mb": {k: round(v, 1) for k, v in by_kind.items()},
            "processes": count, "mem_available_mb": round(mem_available_kb() / 1024, 1), "fds": open_fds()}


def open_fds(pid: int | None = None) -> int:
    """Open file descriptors of this process (or pid): the kernel managers and relays live here."""
    try:
        return len(os.listdir(f"/proc/{pid or os.getpid()}/fd"))
    except OSError:
        return 0


# --- the timer loop (own process) ----------------------------------------------------------

TIMER = r"""
import json, sys, threading, time
tick = float(sys.argv[1])
done = threading.Event()
threading.Thread(target=lambda: (sys.stdin.read(), done.set()), daemon=True).start()
late = []
print("go", flush=True)
while not done.is_set():
    t = time.perf_counter()
    time.sleep(tick)
    late.append(time.perf_counter() - t - tick)
late.sort()
n = len(late)
pick = lambda q: late[min(n - 1, int(q * n))] * 1000 if n else None
print(json.dumps({"ticks": n, "tick_ms": tick * 1000, "worst_ms": late[-1] * 1000 if n else None,
                  "p99_ms": pick(0.99), "p50_ms": pick(0.5)}), flush=True)
"""


class HostWatch:
    """The timer process and the memory sampler, from start() to stop()."""

    def __init__(self, pids: Callable[[], Iterable[int]], sample_s: float, tick_s: float):
        self.pids = pids
        self.sample_s = sample_s
        self.tick_s = tick_s
        self.samples: list[dict] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._timer: subprocess.Popen | None = None
        self.t0 = time.perf_counter()

    def start(self) -> None:
        self._timer = subprocess.Popen([sys.executable, "-c", TIMER, str(self.tick_s)], stdin=subprocess.PIPE,
                                       stdout=subprocess.PIPE, text=True)
        assert self._timer.stdout is not None
        self._timer.stdout.readline()  # "go"
        self._thread = threading.Thread(target=self._sample_loop, name="fleet-sampler", daemon=True)
        self._thread.start()

    def _sample_loop(self) -> None:
        while True:
            timer = self._timer.pid if self._timer else None
            s = memory_sample(p for p in self.pids() if p != timer)
            s["t"] = round(time.perf_counter() - self.t0, 2)
            self.samples.append(s)
            if self._stop.wait(self.sample_s):
                return

    def stop(self) -> dict:
        self._stop.set()
        if self._thread:
            self._thread.join()
        lateness: dict = {}
        if self._timer:
            out, _ = self._timer.communicate("", timeout=60)
            lateness = json.loads(out.strip().splitlines()[-1])
        peak = max(self.samples, key=lambda s: s["pss_mb"]) if self.samples else {}
        return {"lateness": lateness, "samples": self.samples,
                "peak_pss_mb": peak.get("pss_mb"), "peak_by_kind_mb": peak.get("by_kind_mb"),
                "peak_processes": peak.get("processes"), "peak_at_s": peak.get("t"),
                "peak_fds": max((s["fds"] for s in self.samples), default=None),
                "mem_available_low_mb": min((s["mem_available_mb"] for s in self.samples), default=None),
                "mem_available_start_mb": self.samples[0]["mem_available_mb"] if self.samples else None}


# --- the fleet -----------------------------------------------------------------------------

def run_fleet(starts: Sequence[Callable[[Marks], Stop | None]], *, pids: Callable[[], Iterable[int]] | None = None,
              sample_s: float = 1.0, tick_s: float = 0.01, settle_s: float = 0.0, stop: bool = True,
              timeout: float | None = None) -> FleetResult:
    """See the module docstring."""
    n = len(starts)
    watch = HostWatch(pids or tree_pids, sample_s, tick_s)
    watch.start()
    barrier = threading.Barrier(n + 1)
    t0_box: list[float] = []
    kernels: list[dict] = [{} for _ in range(n)]
    stops: list[Stop | None] = [None] * n
    done_at: list[float] = [0.0] * n

    def run(i: int) -> None:
        barrier.wait()
        marks = Marks(i, t0_box[0])
        try:
            stops[i] = starts[i](marks)
        except Exception as exc:  # noqa: BLE001 - that kernel's error; the others go on
            kernels[i]["error"] = f"{type(exc).__name__}: {exc}"[:2000]
        done_at[i] = time.perf_counter() - marks.t0
        kernels[i].update(index=i, marks={k: round(v, 3) for k, v in marks.times.items()}, info=marks.info)

    threads = [threading.Thread(target=run, args=(i,), name=f"fleet-{i}", daemon=True) for i in range(n)]
    for th in threads:
        th.start()
    t0_box.append(time.perf_counter())
    barrier.wait()
    deadline = None if timeout is None else time.monotonic() + timeout
    for th in threads:
        th.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
    hung = [i for i, th in enumerate(threads) if th.is_alive()]
    for i in hung:
        kernels[i].setdefault("error", f"still starting after {timeout} s")
        kernels[i].setdefault("index", i)
    all_s = max(done_at) if done_at else 0.0
    if settle_s:
        time.sleep(settle_s)
    watched = watch.stop()
    result = FleetResult(kernels, round(all_s, 3), watched)
    if stop:
        t = time.perf_counter()
        stoppers = [threading.Thread(target=_quiet(s)) for s in stops if s is not None]
        for th in stoppers:
            th.start()
        for th in stoppers:
            th.join()
        result.stop_s = round(time.perf_counter() - t, 3)
    return result


def _quiet(fn: Stop) -> Stop:
    def run() -> None:
        try:
            fn()
        except Exception as exc:  # noqa: BLE001 - a failed stop is reported, the others go on
            print(f"fleet: a stop failed: {exc!r}", file=sys.stderr)
    return run


def _med(values: list[float]) -> float | None:
    return round(statistics.median(values), 3) if values else None


def summarize(result: FleetResult) -> dict:
    ks = result.kernels
    ok = [k for k in ks if "error" not in k]
    names = sorted({m for k in ok for m in k["marks"]})
    groups: dict[str, list[dict]] = {}
    for k in ok:
        groups.setdefault(str(k["info"].get("group", "all")), []).append(k)
    w = result.watch
    return {
        "n": len(ks), "ok": len(ok), "errors": [k["error"] for k in ks if "error" in k],
        "all_returned_s": result.all_s,
        **{f"all_{m}_s": (round(max(k["marks"][m] for k in ok), 3) if ok and all(m in k["marks"] for k in ok)
                          else None) for m in names},
        "median_s": {g: {m: _med([k["marks"][m] for k in gk if m in k["marks"]]) for m in names}
                     for g, gk in sorted(groups.items())},
        "counts": {g: len(gk) for g, gk in sorted(groups.items())},
        "lateness_ms": {k: (round(v, 2) if isinstance(v, float) else v) for k, v in w["lateness"].items()},
        "peak_pss_mb": w["peak_pss_mb"], "peak_by_kind_mb": w["peak_by_kind_mb"],
        "peak_processes": w["peak_processes"],
        "mem_available_start_mb": w["mem_available_start_mb"], "mem_available_low_mb": w["mem_available_low_mb"],
        "peak_fds": w.get("peak_fds"),
        "stop_s": result.stop_s,
    }


def format_summary(label: str, s: dict) -> str:
    lines = [f"{label}: {s['ok']}/{s['n']} ok, all returned after {s['all_returned_s']:.2f} s"]
    for key in sorted(k for k in s if k.startswith("all_") and k.endswith("_s") and k != "all_returned_s"):
        if s[key] is not None:
            lines.append(f"  time to {key[4:-2]} (all): {s[key]:.2f} s")
    for g, med in s["median_s"].items():
        lines.append(f"  median per kernel [{g}, n={s['counts'][g]}]: "
                     + ", ".join(f"{m} {v:.2f} s" for m, v in med.items() if v is not None))
    lt = s["lateness_ms"]
    if lt:
        lines.append(f"  timer lateness ({lt['tick_ms']:.0f} ms sleeps, {lt['ticks']} ticks): worst {lt['worst_ms']:.1f} ms, "
                     f"p99 {lt['p99_ms']:.1f} ms, p50 {lt['p50_ms']:.2f} ms")
    lines.append(f"  peak PSS {s['peak_pss_mb']:.0f} MB ({s['peak_by_kind_mb']}); "
                 f"MemAvailable {s['mem_available_start_mb']:.0f} MB at start, low-water {s['mem_available_low_mb']:.0f} MB; "
                 f"this process's open fds at most {s['peak_fds']}")
    for e in s["errors"]:
        lines.append(f"  ERROR {e[:300]}")
    return "\n".join(lines)


# --- jupyter_client kernels ----------------------------------------------------------------

def jupyter_start(kernel_name: str, config: Any, cwd: str, code: str, check: Callable[[str], bool],
                  timeout: float = 900.0, on_started: Callable[[Any, Marks], None] | None = None
                  ) -> Callable[[Marks], Stop]:
    """A start callable for a jupyter_client kernel: KernelManager(kernel_name, config).start_kernel(cwd),
    client start_channels + wait_for_ready (mark "ready"), execute `code` (mark "cell"); check(stdout)
    must be True. on_started(km, marks) may add info (e.g. whether a VM was pooled)."""
    from jupyter_client import KernelManager
    from traitlets.config import Config

    def start(marks: Marks) -> Stop:
        km = KernelManager(kernel_name=kernel_name, config=config or Config())
        km.start_kernel(cwd=cwd)
        marks.mark("launched")
        kc = km.client()

        def stop() -> None:
            try:
                kc.stop_channels()
            finally:
                km.shutdown_kernel(now=True)
        try:
            kc.start_channels()
            kc.wait_for_ready(timeout=timeout)
            marks.mark("ready")
            if on_started is not None:
                on_started(km, marks)
            out: list[str] = []
            reply = kc.execute_interactive(code, timeout=timeout,
                                           output_hook=lambda m: out.append(m["content"].get("text", "")))
            marks.mark("cell")
            text = "".join(out)
            if reply["content"]["status"] != "ok" or not check(text):
                raise RuntimeError(f"cell: {reply['content']['status']}, output {text[:200]!r}")
        except BaseException:
            stop()
            raise
        return stop
    return start
