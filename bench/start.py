"""Benchmark: kernel start -> first kernel_info_reply, local ipykernel vs capsem cold vs capsem warm
(pool), all in one run.

    python bench/start.py [--starts 10] [--cold-starts N] [--pool 10] [--burst N] [--memory 512] [--cpus 2]
                          [--breakdown] [--json FILE]

1. local    kernel "python3" (ipykernel on the host): KernelManager.start_kernel -> wait_for_ready
2. cold     capsem kernel, no pool: boots a VM per kernel; breakdown by stage from the kernel's
            facts (KernelVM.info): image verification, QEMU start -> agent hello (with the guest's
            own clock: kernel start, /init, handover, agent), egress + share, ipykernel start
            (kernel_start -> listening), first kernel_info round trip
3. burst    --pool kernels started at once (threads) from a full pool of --pool VMs
4. warm     then capsem kernels one after the other, each claiming a warm VM while the pool refills
            in the background (at most two boots at a time; each start waits for one ready VM and
            records how many were booting)
5. memory   host memory per pooled VM (PSS of its QEMU, vsock backend and keeper) while idle

Each start is timed the way jupyter_client's users start a kernel (start_kernel, start_channels,
wait_for_ready), to three points:
  reply   the kernel_info_reply that wait_for_ready accepts (it takes one only once iopub delivers
          too, else it asks again): the headline, "start -> kernel_info_reply";
  ready   wait_for_ready returns: after that reply it waits for 0.2 s without iopub messages,
          the same 0.2 s for every kernel;
  execute the reply to a first execute (print the cwd, checked to be the notebook folder). A warm
          kernel answers kernel_info while its folder is still being attached and holds other
          requests until it is: this is what a notebook's first cell waits for after wait_for_ready.
  first cell (separate starts, local and warm alternating with the above): start_kernel,
          start_channels and an execute sent at once, without wait_for_ready, to its reply (its
          user_expressions checked: the folder as cwd, its files visible, execution_count 1).
          Issue 19's goal 1: warm/local <= 0.5. --breakdown prints where a warm one's time goes
          (host marks of the claim, attach and release; the guest's own handling of the cell).

Medians over the starts, ratios warm/local and cold/local. Uses a private runtime dir and a
kernelspec in a temp prefix; the load average is recorded with the numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from jupyter_client import KernelManager
from traitlets.config import Config

from capsem_vm.config import DEFAULT_CPUS
from capsem_vm.pool.priority import descendants

STARTUP_TIMEOUT = 900
CLI = [sys.executable, "-m", "capsem_vm.cli"]


def private_setup(prefix_name: str) -> Path:
    """A private runtime dir and capsem kernelspec (first on JUPYTER_PATH) for this process, in a
    new temporary directory; returns the notebook folder made there."""
    base = Path(tempfile.mkdtemp(prefix=prefix_name))
    os.chmod(base, 0o755)
    rt = base / "rt"
    rt.mkdir(mode=0o700)
    os.environ["CAPSEM_RUNTIME_DIR"] = str(rt)
    prefix = base / "prefix"
    subprocess.run(CLI + ["kernel", "install", "--prefix", str(prefix)], check=True, capture_output=True)
    os.environ["JUPYTER_PATH"] = os.pathsep.join([str(prefix / "share" / "jupyter")] +
                                                 ([os.environ["JUPYTER_PATH"]] if os.environ.get("JUPYTER_PATH") else []))
    nb = base / "nb"
    nb.mkdir()
    return nb


def load() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def start_one(kernel_name: str, config: Config | None, cwd: str) -> tuple[float, KernelManager, object]:
    """Start a kernel; returns (start -> accepted kernel_info_reply, manager, client), with the
    other two points on the manager (bench_ready_s, bench_first_execute_s)."""
    t0 = time.perf_counter()
    km = KernelManager(kernel_name=kernel_name, config=config or Config())
    km.bench_t0_wall = time.time()
    km.start_kernel(cwd=cwd)
    km.bench_launched_s = time.perf_counter() - t0  # start_kernel returned
    kc = km.client()
    reply_at = []
    accept = kc._handle_kernel_info_reply  # wait_for_ready calls it once, for the reply it accepts

    def accepted(msg):
        reply_at.append(time.perf_counter() - t0)
        return accept(msg)
    kc._handle_kernel_info_reply = accepted
    kc.start_channels()
    kc.wait_for_ready(timeout=STARTUP_TIMEOUT)  # sends kernel_info_request, waits for the reply
    km.bench_ready_s = time.perf_counter() - t0
    if not reply_at:
        raise RuntimeError("wait_for_ready returned without accepting a kernel_info_reply "
                           "(jupyter_client changed: adapt start_one)")
    t = reply_at[0]
    out = []
    reply = kc.execute_interactive("import os; print(os.getcwd())", timeout=STARTUP_TIMEOUT,
                                   output_hook=lambda m: out.append(m["content"].get("text", "")))
    if reply["content"]["status"] != "ok" or "".join(out).strip() != cwd:
        raise RuntimeError(f"first execute: {reply['content']['status']}, cwd {''.join(out).strip()!r}, not {cwd!r}")
    km.bench_first_execute_s = time.perf_counter() - t0
    return t, km, kc


FIRST_CELL = "import os"
FIRST_CELL_EXPRESSIONS = {"cwd": "os.getcwd()", "files": "sorted(os.listdir())"}
MARKER = "first-cell-marker.txt"  # made in the notebook folder: the first cell must see it


def first_cell_one(kernel_name: str, config: Config | None, cwd: str) -> tuple[float, KernelManager, object]:
    """Start a kernel and send a cell at once, without wait_for_ready (as a client that just runs
    code does: ZMQ queues the request until the kernel is reached); returns (start -> that
    execute_reply, manager, client). The reply's user_expressions must show the notebook folder as
    the cwd with its files visible, and execution_count 1 (nothing ran before it in the user's
    history). Marks for --breakdown on the manager (bench_marks: seconds after the start)."""
    t0, m0 = time.perf_counter(), time.monotonic()
    km = KernelManager(kernel_name=kernel_name, config=config or Config())
    km.start_kernel(cwd=cwd)
    km.bench_launched_s = time.perf_counter() - t0
    kc = km.client()
    kc.start_channels()
    sent = time.monotonic() - m0
    msg_id = kc.execute(FIRST_CELL, user_expressions=FIRST_CELL_EXPRESSIONS)
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while True:
        reply = kc.get_shell_msg(timeout=max(0.1, deadline - time.monotonic()))
        if reply["parent_header"].get("msg_id") == msg_id:
            break
    t = time.perf_counter() - t0
    content = reply["content"]
    exprs = content.get("user_expressions", {})
    got_cwd = exprs.get("cwd", {}).get("data", {}).get("text/plain")
    files = exprs.get("files", {}).get("data", {}).get("text/plain", "")
    if content["status"] != "ok" or got_cwd != repr(cwd) or repr(MARKER) not in files:
        raise RuntimeError(f"first cell: {content.get('status')}, cwd {got_cwd!r}, files {files!r}; "
                           f"wanted cwd {cwd!r} with {MARKER}")
    if content.get("execution_count") != 1:
        raise RuntimeError(f"first cell: execution_count {content.get('execution_count')}, not 1")
    marks = {"launched": km.bench_launched_s, "execute_sent": sent, "execute_reply": t}
    try:
        marks["guest_execute"] = (_date(reply["header"]["date"]) - _date(reply["metadata"]["started"])).total_seconds()
    except (KeyError, TypeError, ValueError):
        pass
    prov = getattr(km, "provisioner", None)
    kvm = getattr(prov, "kernel_vm", None)
    if kvm is not None:
        marks.update({k: v - m0 for k, v in kvm.info().get("marks", {}).items()})
        km.bench_attach_after = getattr(kvm.vm, "attach_after", None)
    km.bench_marks = marks
    km.bench_first_execute_s = t
    return t, km, kc


def _date(value):
    from datetime import datetime
    return value if isinstance(value, datetime) else datetime.fromisoformat(str(value))


def stop(km, kc) -> None:
    try:
        kc.stop_channels()
    finally:
        km.shutdown_kernel(now=True)


def capsem_config(args, pool: bool) -> Config:
    c = Config()
    c.CapsemProvisioner.use_pool = pool
    c.CapsemProvisioner.memory_mb = args.memory
    c.CapsemProvisioner.cpus = args.cpus
    return c


def stages(km, total: float) -> dict:
    info = km.provisioner.kernel_vm.info()
    t = info["timings"]
    boot = info.get("boot") or {}
    kernel_start = info["ready_at"] - info["started_at"]
    out = {"total_s": total, "ready_s": km.bench_ready_s, "first_execute_s": km.bench_first_execute_s,
           "pooled": info["pooled"]}
    if info["pooled"]:
        # claim -> egress ready (start() returns) -> kernel_start with hold, the folder attaching
        # meanwhile (virtiofsd + hot-plug, then the mount) until the kernel is released
        out.update(claim_s=t.get("pool_claim_s"), egress_s=t.get("egress_s"), claimed_vm_s=t.get("ready_s"),
                   hotplug_s=t.get("hotplug_s"), mount_s=t.get("mount_s"), attach_s=t.get("attach_s"),
                   ipykernel_s=kernel_start - t.get("ready_s", 0))
    else:
        out.update(verify_s=t.get("verify_s"), qemu_to_hello_s=t.get("hello_s"),
                   guest_kernel_s=boot.get("kernel_s"), guest_init_done_s=boot.get("init_s"),
                   guest_agent_s=boot.get("agent_s"),
                   egress_share_s=t.get("ready_s", 0) - t.get("hello_s", 0) - t.get("verify_s", 0),
                   ipykernel_s=kernel_start - t.get("ready_s", 0))
    # before the VM part: KernelManager, connection file, (claim); after it: the channels and the
    # first kernel_info round trip that wait_for_ready accepts
    out["before_vm_s"] = info["started_at"] - km.bench_t0_wall
    out["kernel_info_s"] = total - (info["ready_at"] - km.bench_t0_wall)
    return out


def med(rows: list[dict], key: str):
    vals = [r[key] for r in rows if isinstance(r.get(key), (int, float))]
    return round(statistics.median(vals), 3) if vals else None


def pool_status() -> dict:
    out = subprocess.run(CLI + ["pool", "status", "--json"], capture_output=True, text=True, timeout=60)
    if out.returncode:
        raise RuntimeError(out.stderr)
    return json.loads(out.stdout)


def wait_ready(n: int, timeout: float = 3600) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        st = pool_status()
        if sum(v["state"] == "ready" for v in st["vms"]) >= n:
            return st
        if time.monotonic() > deadline:
            raise RuntimeError(f"pool not filled to {n}: {st}")
        time.sleep(2)


def pss_kb(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def pooled_memory(st: dict) -> dict:
    per = []
    for v in st["vms"]:
        if v["state"] != "ready":
            continue
        pids = [v["keeper_pid"]] + descendants(v["keeper_pid"])
        per.append({"total_mb": sum(pss_kb(p) for p in pids) / 1024, "qemu_mb": pss_kb(v["qemu_pid"]) / 1024,
                    "keeper_mb": pss_kb(v["keeper_pid"]) / 1024, "qemu_rss_mb": v["rss_mb"]})
    return {k: round(statistics.median(r[k] for r in per), 1) for k in per[0]} if per else {}


BREAKDOWN = (  # a warm first cell, in the order things happen (seconds after start_kernel was called)
    ("claim_start", "pool claimed, ClaimedVM.start begins (egress listeners, egress_setup)"),
    ("started", "ClaimedVM.start returned"),
    ("kernel_started", "kernel_start {hold} replied (the key went over)"),
    ("launched", "start_kernel returned"),
    ("execute_sent", "channels started, execute_request sent"),
    ("attach_gate", "attach gate opened (first shell reply, a held request, or the timeout)"),
    ("virtiofsd", "virtiofsd started for the folder (host only)"),
    ("hotplugged", "QMP chardev-add + device_add done"),
    ("mounted", "the guest mounted the folder"),
    ("released", "kernel_release replied (cwd changed, held requests let through)"),
    ("execute_reply", "execute_reply received"),
)


def print_breakdown(rows: list[dict]) -> None:
    print("    warm first cell, medians (s after start; step = since the previous line):")
    prev = 0.0
    steps = sorted(((med(rows, key), key, what) for key, what in BREAKDOWN if med(rows, key) is not None))
    for m, key, what in steps:
        print(f"    {key:<15} {m:7.3f}  (+{m - prev:6.3f})  {what}")
        prev = m
    ge = med(rows, "guest_execute")
    if ge is not None:
        print(f"    guest_execute   {ge:7.3f}  the kernel's own handling of the cell (reply date - metadata started, guest clock)")
    causes = {}
    for r in rows:
        causes[r.get("attach_after")] = causes.get(r.get("attach_after"), 0) + 1
    print(f"    attach gate opened by: {causes}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--starts", type=int, default=10)
    ap.add_argument("--cold-starts", type=int, default=None, help="default: --starts")
    ap.add_argument("--pool", type=int, default=10, help="pool size, and kernels started at once")
    ap.add_argument("--memory", type=int, default=512)
    ap.add_argument("--cpus", type=int, default=DEFAULT_CPUS, help="per VM (default: the kernelspec's)")
    ap.add_argument("--burst", type=int, default=None, help="kernels started at once from the full pool "
                    "(default: --pool; 0: none)")
    ap.add_argument("--breakdown", action="store_true",
                    help="print where a warm first cell's time goes (host and guest marks, medians)")
    ap.add_argument("--json", help="write the results here too")
    args = ap.parse_args()
    cold_n = args.starts if args.cold_starts is None else args.cold_starts

    nb = private_setup("capsem-bench-start-")
    (nb / MARKER).write_text("the first cell sees this\n")
    burst_n = args.pool if args.burst is None else args.burst
    results: dict = {"args": vars(args), "load_start": load()}

    def log(msg):
        print(f"[{time.strftime('%H:%M:%S')} load {load()}] {msg}", flush=True)

    # 1. local
    local, local_ready, local_exec = [], [], []
    for i in range(args.starts):
        t, km, kc = start_one("python3", None, str(nb))
        stop(km, kc)
        local.append(t)
        local_ready.append(km.bench_ready_s)
        local_exec.append(km.bench_first_execute_s)
        log(f"local {i + 1}/{args.starts}: {t:.3f} s (ready {local_ready[-1]:.3f} s, "
            f"first execute {local_exec[-1]:.3f} s)")
    results["local_s"] = local
    results["local_ready_s"] = local_ready
    results["local_first_execute_s"] = local_exec
    local_cell = []
    for i in range(args.starts):
        t, km, kc = first_cell_one("python3", None, str(nb))
        stop(km, kc)
        local_cell.append(t)
        log(f"local first cell {i + 1}/{args.starts}: {t:.3f} s")
    results["local_first_cell_s"] = local_cell

    # 2. cold
    cold = []
    for i in range(cold_n):
        t, km, kc = start_one("capsem", capsem_config(args, False), str(nb))
        cold.append(stages(km, t))
        stop(km, kc)
        log(f"cold {i + 1}/{cold_n}: {t:.2f} s {cold[-1]}")
    results["cold"] = cold

    # 3. the pool: fill it, then a burst, then sequential warm starts
    out = subprocess.run(CLI + ["pool", "start", "--size", str(args.pool), "--memory", str(args.memory),
                                "--cpus", str(args.cpus), "--parallel", "2"], capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(out.stderr)
    try:
        t_fill = time.monotonic()
        st = wait_ready(args.pool)
        results["pool_fill_s"] = time.monotonic() - t_fill
        results["memory_per_pooled_vm"] = pooled_memory(st)
        log(f"pool of {args.pool} full after {results['pool_fill_s']:.0f} s; per VM {results['memory_per_pooled_vm']}")
        # 3a. burst: all at once from the full pool
        log(f"burst: {burst_n} kernels at once")
        burst: list = [None] * burst_n
        def run(i):
            try:
                burst[i] = start_one("capsem", capsem_config(args, True), str(nb))
            except Exception as exc:  # noqa: BLE001 - reported
                burst[i] = exc
        t0 = time.perf_counter()
        threads = [threading.Thread(target=run, args=(i,)) for i in range(burst_n)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        wall = time.perf_counter() - t0
        ok = [b for b in burst if isinstance(b, tuple)]
        results["burst"] = {"kernels": burst_n, "all_ready_s": wall, "ok": len(ok),
                            "errors": [repr(b) for b in burst if not isinstance(b, tuple)],
                            "per_kernel": [stages(km, t) for t, km, kc in ok]}
        for t, km, kc in ok:
            stop(km, kc)
        log(f"burst: {len(ok)}/{burst_n} ready, all after {wall:.2f} s")
        # 3b. sequential warm starts while the pool refills (each waits for one ready VM)
        warm, warm_cell = [], []
        for i in range(args.starts):
            st = wait_ready(1)
            booting = sum(v["state"] == "booting" for v in st["vms"])
            t, km, kc = start_one("capsem", capsem_config(args, True), str(nb))
            warm.append({**stages(km, t), "pool_booting": booting})
            stop(km, kc)
            log(f"warm {i + 1}/{args.starts}: {t:.2f} s {warm[-1]}")
            # the first cell sent at once, on the next warm VM (alternating with the above)
            st = wait_ready(1)
            t, km, kc = first_cell_one("capsem", capsem_config(args, True), str(nb))
            warm_cell.append({"total_s": t, "pooled": km.provisioner.kernel_vm.pooled,
                              "attach_after": getattr(km, "bench_attach_after", None), **km.bench_marks})
            stop(km, kc)
            log(f"warm first cell {i + 1}/{args.starts}: {t:.3f} s {warm_cell[-1]}")
        results["warm"] = warm
        results["warm_first_cell"] = warm_cell

    finally:
        subprocess.run(CLI + ["pool", "stop"], capture_output=True)
    results["load_end"] = load()

    lm = statistics.median(local)
    cm = med(cold, "total_s")
    wm = med(results["warm"], "total_s")
    print("\n=== kernel start -> kernel_info_reply (medians) ===")
    print(f"local ipykernel     {lm:8.3f} s   (n={len(local)})")
    if cm is not None:
        print(f"capsem cold         {cm:8.3f} s   (n={len(cold)})  cold/local = {cm / lm:.1f}")
        for k in ("before_vm_s", "verify_s", "qemu_to_hello_s", "guest_kernel_s", "guest_init_done_s",
                  "guest_agent_s", "egress_share_s", "ipykernel_s", "kernel_info_s"):
            print(f"    {k:<20} {med(cold, k)}")
    print(f"capsem warm (pool)  {wm:8.3f} s   (n={len(results['warm'])})  warm/local = {wm / lm:.2f}")
    for k in ("before_vm_s", "claim_s", "egress_s", "claimed_vm_s", "ipykernel_s", "kernel_info_s",
              "hotplug_s", "mount_s", "attach_s"):
        print(f"    {k:<20} {med(results['warm'], k)}")
    lr, wr = statistics.median(local_ready), med(results["warm"], "ready_s")
    print(f"start -> wait_for_ready returns (+ its 0.2 s iopub quiet): local {lr:.3f} s, warm {wr:.3f} s, "
          f"warm/local = {wr / lr:.2f}")
    lx, wx = statistics.median(local_exec), med(results["warm"], "first_execute_s")
    print(f"start -> first execute reply (in the folder): local {lx:.3f} s, warm {wx:.3f} s, "
          f"warm/local = {wx / lx:.2f}")
    lc, wc = statistics.median(local_cell), med(warm_cell, "total_s")
    print(f"start -> first cell reply (sent at once, no wait_for_ready; in the folder, execution_count 1): "
          f"local {lc:.3f} s, warm {wc:.3f} s, warm/local = {wc / lc:.2f}  <- issue 19 goal 1 (<= 0.5)")
    if args.breakdown:
        print_breakdown(warm_cell)
    b = results["burst"]
    print(f"{b['kernels']} at once from a pool of {args.pool}: {b['ok']} ok, all ready after {b['all_ready_s']:.2f} s, "
          f"median per kernel {med(b['per_kernel'], 'total_s')} s, "
          f"{sum(1 for k in b['per_kernel'] if k['pooled'])} of them on pooled VMs")
    print(f"host memory per pooled VM (PSS, idle): {results['memory_per_pooled_vm']}")
    print(f"load average: start {results['load_start']}, end {results['load_end']}")
    results["summary"] = {"local_median_s": lm, "cold_median_s": cm, "warm_median_s": wm,
                          "warm_over_local": wm / lm, "cold_over_local": cm / lm if cm else None,
                          "local_ready_s": lr, "warm_ready_s": wr, "warm_ready_over_local": wr / lr,
                          "local_first_execute_s": lx, "warm_first_execute_s": wx,
                          "warm_first_execute_over_local": wx / lx,
                          "local_first_cell_s": lc, "warm_first_cell_s": wc, "warm_first_cell_over_local": wc / lc}
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, default=str))
    subprocess.run(["rm", "-rf", str(nb.parent)])
    return 0


if __name__ == "__main__":
    sys.exit(main())
