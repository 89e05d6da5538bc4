"""Cold start against the boot floor, side by side in one run (issue 19, goal 4).

    python bench/cold.py [--pairs 3] [--memory 512] [--cpus 2] [--json FILE]

cold   a capsem kernel with no pool, timed the way jupyter_client's users start one
       (bench/start.py's start_one): KernelManager.start_kernel -> the first execute reply
       (print the cwd, checked to be the notebook folder). Also printed: the kernel_info_reply
       wait_for_ready accepts, and the cold stages of bench/start.py.
floor  bench/boot.py's floor: the same kernel, the same QEMU command line and helpers, with a bare
       busybox initramfs whose /init prints a marker at once: QEMU start -> marker.

The kinds alternate (cold, floor, floor, cold, ...) so that load from other processes on this
shared host hits both alike. Target: cold/floor <= 1.5. Load average printed before and after.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import boot as bench_boot  # noqa: E402  (patches capsem_vm.vm.spawn to time QEMU start: floor only)
import start as bench_start  # noqa: E402
from capsem_vm.config import DEFAULT_CPUS, VMConfig  # noqa: E402


def cold_once(args, nb: Path) -> dict:
    t, km, kc = bench_start.start_one("capsem", bench_start.capsem_config(args, False), str(nb))
    try:
        return bench_start.stages(km, t)
    finally:
        bench_start.stop(km, kc)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=3)
    ap.add_argument("--memory", type=int, default=512)
    ap.add_argument("--cpus", type=int, default=DEFAULT_CPUS)
    ap.add_argument("--json", help="write all samples here too")
    args = ap.parse_args()
    nb = bench_start.private_setup("capsem-bench-cold-")
    load0 = bench_start.load()
    config = VMConfig(memory_mb=args.memory, cpus=args.cpus)
    cold, floor = [], []
    with bench_boot.floor_image(None) as floor_dir:
        for i in range(args.pairs):
            for kind in (("cold", "floor") if i % 2 == 0 else ("floor", "cold")):
                if kind == "cold":
                    r = cold_once(args, nb)
                    cold.append(r)
                    print(f"[{time.strftime('%H:%M:%S')} load {bench_start.load()}] pair {i + 1} cold : first execute "
                          f"{r['first_execute_s']:.2f} s (kernel_info {r['total_s']:.2f} s; {r})", flush=True)
                else:
                    f = asyncio.run(bench_boot.boot_floor(config, floor_dir))
                    floor.append(f)
                    print(f"[{time.strftime('%H:%M:%S')} load {bench_start.load()}] pair {i + 1} floor: marker "
                          f"{f['marker_s']:.2f} s (guest /init {f['init_uptime_s']})", flush=True)
    load1 = bench_start.load()
    c_exec = statistics.median(r["first_execute_s"] for r in cold)
    c_info = statistics.median(r["total_s"] for r in cold)
    f_med = statistics.median(f["marker_s"] for f in floor)
    print(f"\n=== cold start vs boot floor: {args.pairs} pairs alternated, {args.memory} MB, {args.cpus} vCPU; "
          f"load {load0} -> {load1} ===")
    print(f"cold  start -> first execute reply  median {c_exec:6.2f} s  (runs: "
          + ", ".join(f"{r['first_execute_s']:.2f}" for r in cold) + ")")
    print(f"cold  start -> kernel_info_reply    median {c_info:6.2f} s")
    for k in ("verify_s", "qemu_to_hello_s", "guest_kernel_s", "guest_init_done_s", "guest_agent_s",
              "egress_share_s", "ipykernel_s", "kernel_info_s"):
        print(f"  {k:<22} {bench_start.med(cold, k)}")
    print(f"floor QEMU start -> /init marker    median {f_med:6.2f} s  (runs: "
          + ", ".join(f"{f['marker_s']:.2f}" for f in floor) + ")")
    print(f"ratio cold/floor: {c_exec / f_med:.2f}x (target <= 1.50x); kernel_info/floor {c_info / f_med:.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "args": vars(args), "load": [load0, load1], "cold": cold, "floor": floor,
            "median_cold_first_execute_s": c_exec, "median_cold_kernel_info_s": c_info,
            "median_floor_s": f_med, "ratio": c_exec / f_med}, indent=1))
    shutil.rmtree(nb.parent, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
