"""Benchmark: the agent API (capsem_kernel.Sandbox) side by side with the same calls on a local
ipykernel, in one run.

    .venv/bin/python bench/agent.py [--starts 3] [--rounds 100] [--memory MB] [--cpus N] [--json FILE]

  first result   `Sandbox()` -> the first `run_code("1 + 1")` has returned (what an agent waits
                 for before its first action): capsem cold (no pool: a VM boots), capsem warm (a
                 pooled VM is claimed; each start waits until the pool is full again), local
                 (a KernelManager + the same run_code over a host ipykernel). Medians of --starts.
  round trips    run_code("1 + 1") per second on one running sandbox (--rounds after 5 warm-ups),
                 and its median latency. For capsem, also the two parts of that: the execute round
                 trip alone (jupyter_client, as bench/kernel.py measures it) and one audit barrier
                 (run_code takes two: rows are read after the barrier, docs/AUDIT.md).

`LocalSandbox` below is the same run_code (capsem_kernel.execution.ExecutionBuilder over the iopub
messages of the request, then the execute_reply) on a local ipykernel, without network rows.
Everything runs in a private runtime/data/config dir (its own pool, audit log, no user policy:
deny-all), so nothing else on the machine is touched; the load average is printed with the numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CLI = [sys.executable, "-m", "capsem_vm.cli"]
CODE = "1 + 1"


class LocalSandbox:
    """run_code/close of capsem_kernel.Sandbox on a local ipykernel ("python3")."""

    def __init__(self, folder: str):
        from jupyter_client import KernelManager
        self._km = KernelManager(kernel_name="python3")
        self._km.start_kernel(cwd=folder)
        self._kc = self._km.client()
        self._kc.start_channels()
        self._kc.wait_for_ready(timeout=120)

    def run_code(self, code: str):
        from capsem_kernel.execution import ExecutionBuilder
        builder = ExecutionBuilder()
        msg_id = self._kc.execute(code, allow_stdin=False)
        while not builder.idle:
            msg = self._kc.get_iopub_msg(timeout=120)
            if msg.get("parent_header", {}).get("msg_id") == msg_id:
                builder.feed(msg)
        while self._kc.get_shell_msg(timeout=120).get("parent_header", {}).get("msg_id") != msg_id:
            pass
        return builder.execution

    def close(self) -> None:
        self._kc.stop_channels()
        self._km.shutdown_kernel(now=True)


def first_result(make) -> tuple[float, float, object]:
    """(seconds to the sandbox object, seconds to the first result, the sandbox)."""
    t0 = time.perf_counter()
    sb = make()
    t_obj = time.perf_counter() - t0
    ex = sb.run_code(CODE)
    t_first = time.perf_counter() - t0
    if ex.text != "2":
        raise RuntimeError(f"first run_code gave {ex.text!r} ({ex.error})")
    return t_obj, t_first, sb


def round_trips(sb, rounds: int) -> dict:
    for _ in range(5):
        sb.run_code(CODE)
    samples = []
    t0 = time.perf_counter()
    for _ in range(rounds):
        t = time.perf_counter()
        ex = sb.run_code(CODE)
        samples.append(time.perf_counter() - t)
        if ex.text != "2":
            raise RuntimeError(f"run_code gave {ex.text!r} ({ex.error})")
    wall = time.perf_counter() - t0
    return {"per_s": rounds / wall, "median_s": statistics.median(samples), "min_s": min(samples)}


def capsem_parts(sb, rounds: int) -> dict:
    """The execute round trip alone (no barrier, no rows) and one audit barrier, medians."""
    kc = sb._client()
    execs, barriers = [], []
    for _ in range(rounds):
        t = time.perf_counter()
        msg_id = kc.execute(CODE)
        while kc.get_shell_msg(timeout=120)["parent_header"].get("msg_id") != msg_id:
            pass
        execs.append(time.perf_counter() - t)
        t = time.perf_counter()
        sb._barrier()
        barriers.append(time.perf_counter() - t)
    while True:  # the iopub messages of those executes, not read above
        try:
            kc.get_iopub_msg(timeout=0.5)
        except queue.Empty:
            break
    return {"execute_s": statistics.median(execs), "barrier_s": statistics.median(barriers)}


def pool(*args: str) -> dict:
    out = subprocess.run(CLI + ["pool", *args], capture_output=True, text=True, timeout=300)
    if out.returncode:
        raise RuntimeError(f"capsem pool {' '.join(args)}: {out.stdout}{out.stderr}")
    return json.loads(out.stdout) if "--json" in args else {}


def wait_pool_full(size: int, timeout: float = 1800) -> None:
    deadline = time.monotonic() + timeout
    while sum(v["state"] == "ready" for v in pool("status", "--json")["vms"]) < size:
        if time.monotonic() > deadline:
            raise RuntimeError(f"the pool did not fill to {size} in {timeout:.0f} s")
        time.sleep(1)


def med(rows: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in rows)


def fmt(seconds: float) -> str:
    return f"{seconds * 1000:9.1f} ms" if seconds < 1 else f"{seconds:9.2f} s "


def main() -> int:
    from capsem_vm.config import DEFAULT_CPUS, DEFAULT_MEMORY_MB
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--starts", type=int, default=3, help="starts of each kind (median)")
    ap.add_argument("--rounds", type=int, default=100, help="run_code round trips")
    ap.add_argument("--memory", type=int, default=DEFAULT_MEMORY_MB, help="guest memory (MB)")
    ap.add_argument("--cpus", type=int, default=DEFAULT_CPUS, help="guest vCPUs")
    ap.add_argument("--json", metavar="FILE", help="also write the raw numbers here")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="capsem-bench-agent-") as tmp:
        for name in ("rt", "data", "config", "work"):
            (Path(tmp) / name).mkdir(mode=0o700)
        os.environ.update(CAPSEM_RUNTIME_DIR=f"{tmp}/rt", CAPSEM_DATA_DIR=f"{tmp}/data",
                          CAPSEM_CONFIG_DIR=f"{tmp}/config")
        from capsem_kernel import Sandbox
        flavour = {"memory_mb": args.memory, "cpus": args.cpus}
        work = f"{tmp}/work"
        res: dict = {"load_before": os.getloadavg()[0], "cpus": os.cpu_count(), **flavour}
        print(f"load average before: {res['load_before']:.2f} on {res['cpus']} CPUs; "
              f"guest {args.memory} MB, {args.cpus} vCPU", flush=True)

        def starts(kind: str, make, before=None) -> list[dict]:
            rows = []
            for i in range(args.starts):
                if before:
                    before()
                t_obj, t_first, sb = first_result(make)
                info = sb.info() if hasattr(sb, "info") else {}
                sb.close()
                rows.append({"object_s": t_obj, "first_result_s": t_first, "pooled": info.get("pooled")})
                print(f"  {kind} {i + 1}/{args.starts}: Sandbox() {t_obj:.2f} s, first result {t_first:.2f} s"
                      + (f" (pooled: {info.get('pooled')})" if info else ""), flush=True)
            return rows

        res["local"] = starts("local", lambda: LocalSandbox(work))
        res["cold"] = starts("cold", lambda: Sandbox(folder=work, use_pool=False, **flavour))
        if any(r["pooled"] for r in res["cold"]):
            raise RuntimeError("a cold start claimed a pooled VM")
        pool("start", "--size", "1", "--memory", str(args.memory), "--cpus", str(args.cpus))
        try:
            res["warm"] = starts("warm", lambda: Sandbox(folder=work, **flavour), before=lambda: wait_pool_full(1))
        finally:
            pool("stop")
        if not all(r["pooled"] for r in res["warm"]):
            raise RuntimeError("a warm start did not claim a pooled VM")

        print(f"round trips: {args.rounds} x run_code({CODE!r})", flush=True)
        local = LocalSandbox(work)
        try:
            res["local_rt"] = round_trips(local, args.rounds)
        finally:
            local.close()
        with Sandbox(folder=work, use_pool=False, **flavour) as sb:
            res["capsem_rt"] = round_trips(sb, args.rounds)
            res["capsem_parts"] = capsem_parts(sb, args.rounds)
        res["load_after"] = os.getloadavg()[0]

    lf, cf, wf = (med(res[k], "first_result_s") for k in ("local", "cold", "warm"))
    lo, co, wo = (med(res[k], "object_s") for k in ("local", "cold", "warm"))
    lr, cr = res["local_rt"], res["capsem_rt"]
    print()
    print(f"{'':28}{'local':>12}{'capsem':>12}{'ratio':>9}")
    print(f"{'Sandbox() -> first result':28}")
    print(f"{'  cold (VM boots)':28}{fmt(lf)}{fmt(cf)}{cf / lf:8.1f}x")
    print(f"{'  warm (pooled VM)':28}{fmt(lf)}{fmt(wf)}{wf / lf:8.1f}x")
    print(f"{'  of which Sandbox(), cold':28}{fmt(lo)}{fmt(co)}{co / lo:8.1f}x")
    print(f"{'  of which Sandbox(), warm':28}{fmt(lo)}{fmt(wo)}{wo / lo:8.1f}x")
    print(f"{'run_code round trips / s':28}{lr['per_s']:10.1f}  {cr['per_s']:10.1f}  {cr['per_s'] / lr['per_s']:8.3f}x")
    print(f"{'run_code median latency':28}{fmt(lr['median_s'])}{fmt(cr['median_s'])}{cr['median_s'] / lr['median_s']:8.1f}x")
    parts = res["capsem_parts"]
    print(f"{'  capsem: execute alone':28}{'':12}{fmt(parts['execute_s'])}")
    print(f"{'  capsem: one audit barrier':28}{'':12}{fmt(parts['barrier_s'])}  (run_code takes two)")
    print(f"load average after: {res['load_after']:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
