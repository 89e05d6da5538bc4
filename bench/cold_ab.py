"""Benchmark: cold starts of two VM images side by side (A/B), for changes inside the guest.

    python bench/cold_ab.py A_IMAGE B_IMAGE [--pairs 4] [--memory 512] [--cpus 2] [--json FILE]

A_IMAGE and B_IMAGE are image directories (or names in the image cache), for example the image
built before a guest-agent change and the one built after (`capsem image build` prints the
directory; build the "before" one into another cache with CAPSEM_CACHE_DIR=...). Cold starts
alternate A, B, A, B, ... in this one process, so the host's noise falls on both alike.

Per start: start -> the kernel_info_reply wait_for_ready accepts, the cold stages of bench/start.py
(QEMU -> agent hello, egress and share, the guest's ipykernel start), and the kernel process's
CPU time in the guest (from its /proc stat, read through the agent once the kernel answered):
under TCG the ipykernel start is CPU-bound, so that CPU time is what an import-time change cuts.
Prints medians, B/A ratios and how many pairs B won.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import sys
from pathlib import Path

from traitlets.config import Config

import start as bench_start
from capsem_kernel import loop_thread
from capsem_vm.errors import ImageError
from capsem_vm.image.store import resolve_image


def guest_kernel_cpu_s(km) -> float | None:
    """CPU seconds (user + system) the guest kernel process has used so far."""
    kernel_vm = km.provisioner.kernel_vm
    pid = kernel_vm.kernel_pid
    if not isinstance(pid, int):
        return None

    async def read():
        proc = await kernel_vm.vm.control.exec(["cat", f"/proc/{pid}/stat"])
        out = bytearray()
        async for fd, data in proc.output():
            if fd == 1:
                out.extend(data)
        return bytes(out).decode()
    stat = loop_thread.run_sync(asyncio.wait_for(read(), 120), 130)
    fields = stat.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime (guest ticks)


def config(image: str, args) -> Config:
    c = bench_start.capsem_config(args, pool=False)
    c.CapsemProvisioner.image = image
    return c


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("a_image", help="baseline image (directory or name)")
    ap.add_argument("b_image", help="image to compare with it")
    ap.add_argument("--pairs", type=int, default=4)
    ap.add_argument("--memory", type=int, default=512)
    ap.add_argument("--cpus", type=int, default=bench_start.DEFAULT_CPUS)
    ap.add_argument("--json", help="write the results here too")
    args = ap.parse_args()
    try:
        images = {"A": str(resolve_image(args.a_image)), "B": str(resolve_image(args.b_image))}
    except ImageError as exc:
        raise SystemExit(f"cold_ab: {exc}") from None
    if images["A"] == images["B"]:
        raise SystemExit(f"cold_ab: A and B are the same image ({images['A']}): nothing to compare")

    nb = bench_start.private_setup("capsem-bench-cold-ab-")
    rows: dict[str, list[dict]] = {"A": [], "B": []}
    for i in range(args.pairs):
        for side in ("A", "B"):
            t, km, kc = bench_start.start_one("capsem", config(images[side], args), str(nb))
            try:
                row = bench_start.stages(km, t)
                row["guest_kernel_cpu_s"] = guest_kernel_cpu_s(km)
            finally:
                bench_start.stop(km, kc)
            rows[side].append(row)
            print(f"[load {bench_start.load()}] pair {i + 1}/{args.pairs} {side}: {t:.2f} s, ipykernel stage "
                  f"{row['ipykernel_s']:.2f} s, guest kernel CPU {row['guest_kernel_cpu_s']} s", flush=True)

    keys = ("total_s", "qemu_to_hello_s", "egress_share_s", "ipykernel_s", "guest_kernel_cpu_s", "kernel_info_s")
    print(f"\n=== cold starts, {args.pairs} alternating pairs (medians) ===")
    print(f"A {images['A']}\nB {images['B']}")
    summary = {}
    for k in keys:
        a, b = bench_start.med(rows["A"], k), bench_start.med(rows["B"], k)
        wins = sum(rb[k] < ra[k] for ra, rb in zip(rows["A"], rows["B"])
                   if isinstance(ra.get(k), (int, float)) and isinstance(rb.get(k), (int, float)))
        ratio = b / a if a and b is not None else None
        summary[k] = {"A": a, "B": b, "B_over_A": ratio, "B_lower_in_pairs": wins}
        print(f"{k:<20} A {a!s:>8}  B {b!s:>8}  B/A {ratio:.2f}  B lower in {wins} of {args.pairs} pairs"
              if ratio is not None else f"{k:<20} A {a}  B {b}")
    if args.json:
        Path(args.json).write_text(json.dumps({"images": images, "rows": rows, "summary": summary}, indent=1))
    shutil.rmtree(nb.parent, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
