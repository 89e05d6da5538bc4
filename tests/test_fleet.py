"""bench/fleet.py without VMs: starts released together, marks, errors kept per kernel, medians per
group, the timer's lateness and the memory samples of the pids given."""

import importlib.util
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

_spec = importlib.util.spec_from_file_location("bench_fleet", Path(__file__).parents[1] / "bench" / "fleet.py")
fleet = importlib.util.module_from_spec(_spec)
sys.modules["bench_fleet"] = fleet  # dataclasses look their module up there
_spec.loader.exec_module(fleet)


def test_starts_are_released_together_and_marks_errors_and_groups_are_kept():
    entered: list[float] = []
    stopped: list[int] = []
    lock = threading.Lock()

    def make(i):
        def start(marks):
            with lock:
                entered.append(time.perf_counter())
            time.sleep(0.05 * (i + 1))
            marks.mark("ready")
            if i == 3:
                raise RuntimeError("kernel 3 broke")
            marks.mark("cell")
            marks.info["group"] = "even" if i % 2 == 0 else "odd"
            return lambda: stopped.append(i)
        return start

    result = fleet.run_fleet([make(i) for i in range(5)], sample_s=0.05)
    s = result.summary()
    assert max(entered) - min(entered) < 0.5  # the barrier let them go together
    assert s["n"] == 5 and s["ok"] == 4 and s["errors"] == ["RuntimeError: kernel 3 broke"]
    assert sorted(stopped) == [0, 1, 2, 4]  # the failed one returned no stop
    assert s["counts"] == {"even": 3, "odd": 1}
    assert abs(s["median_s"]["even"]["ready"] - 0.15) < 0.1
    assert abs(s["all_ready_s"] - 0.25) < 0.15 and s["all_ready_s"] <= s["all_cell_s"]
    assert result.kernels[3]["marks"]["ready"] > 0 and "cell" not in result.kernels[3]["marks"]
    lt = s["lateness_ms"]
    assert lt["ticks"] > 0 and lt["p50_ms"] <= lt["p99_ms"] <= lt["worst_ms"]
    assert s["mem_available_low_mb"] <= s["mem_available_start_mb"]


def test_memory_counts_the_pids_given_by_kind_and_not_the_timer():
    child = subprocess.Popen([sys.executable, "-c", "import time; b = bytearray(64 << 20); b[::4096] = b'x' * (len(b) // 4096); time.sleep(30)"])
    try:
        time.sleep(1.0)
        result = fleet.run_fleet([lambda marks: None], pids=lambda: [child.pid], sample_s=0.05, settle_s=0.2)
        w = result.watch
        assert w["peak_pss_mb"] >= 60
        assert set(w["peak_by_kind_mb"]) == {"other"}  # only the child: not this process, not the timer
        mine = fleet.run_fleet([lambda marks: None], sample_s=0.05)  # default: this process and its children
        assert "this process" in mine.watch["peak_by_kind_mb"]
        assert all(p != os.getpid() for p in fleet.descendants([os.getpid()]))
        assert child.pid in fleet.tree_pids()
    finally:
        child.kill()
        child.wait()


def test_a_start_that_hangs_is_an_error_after_the_timeout():
    gate = threading.Event()
    result = fleet.run_fleet([lambda m: gate.wait(10) and None, lambda m: m.mark("ready") and None],
                             timeout=0.5, sample_s=0.1)
    gate.set()
    s = result.summary()
    assert s["ok"] == 1 and "still starting" in s["errors"][0]
