"""Benchmark: host memory of a pool of idle pooled VMs, as it fills and after claim-and-release
cycles, beside the claim latency; before (another code tree, e.g. main) and after (this one) in
one run.

    python bench/density.py [--sizes 10,20] [--cycles 3] [--memory 512] [--before-tree /work/main]
                            [--before-cache DIR] [--after-cache DIR] [--json FILE]

Per variant and pool size: start a pool (`capsem pool start` from that variant's tree, its image
cache), then
  fill    every 2 s, the VMs ready and the host PSS of every pooled VM's processes (its keeper, the
          keeper's children: QEMU, vhost-device-vsock), summed: the curve of host memory;
  idle    once full and 15 s quiet: per VM, the PSS of its keeper tree, split into QEMU's guest RAM
          (the memfd), QEMU's TCG translation cache (its anonymous rwx mappings: reported apart,
          there is none under KVM), the rest of QEMU, the keeper and the vsock backend;
  cycles  --cycles times: a capsem kernel claims a pooled VM (jupyter_client's start_kernel ->
          kernel_info_reply, then a first execute in the notebook folder, as bench/start.py),
          is shut down, the pool refills; then the pool's memory again.
PSS as bench/start.py and bench/boot.py define it (smaps_rollup, a shared page counted 1/n in
each of its n mappers: the guest RAM memfd QEMU shares with the vsock backend, the kernel image all
QEMUs map). The claims run this tree's provisioner in both variants: what differs is the pool
(keeper, QEMU command line, guest). The before variant is the other tree's code and image.
Holds the VM lock for the whole run (run it under flock): about 15 min for --sizes 10,20.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from start import CLI, capsem_config, load, pool_status, private_setup, pss_kb, start_one, stop  # noqa: E402

from capsem_vm.pool.priority import descendants  # noqa: E402

SETTLE_S = 15  # free page reporting acts a few seconds after the guest freed its memory


def qemu_split_kb(pid: int) -> dict:
    """QEMU's PSS by mapping kind: guest RAM (the memfd), TCG's translation cache (anonymous
    rwx), the rest."""
    out = collections.Counter()
    kind = "other"
    try:
        text = Path(f"/proc/{pid}/smaps").read_text()
    except OSError:
        return {}
    for line in text.splitlines():
        parts = line.split()
        if not parts:
            continue
        if not parts[0].endswith(":"):  # a mapping's header line
            kind = ("guest_ram" if "memory-backend-memfd" in line else
                    "tcg" if len(parts) >= 2 and parts[1] == "rwxp" and len(parts) == 5 else "other")
        elif parts[0] == "Pss:":
            out[kind] += int(parts[1])
    return dict(out)


def vm_memory(v: dict) -> dict:
    """MB of PSS of one pooled VM's processes."""
    keeper = v["keeper_pid"]
    pids = [keeper] + descendants(keeper)
    qemu = v.get("qemu_pid")
    split = qemu_split_kb(qemu) if qemu else {}
    total = sum(pss_kb(p) for p in pids)
    mb = lambda kb: round(kb / 1024, 1)  # noqa: E731
    return {"total_mb": mb(total), "qemu_mb": mb(pss_kb(qemu)) if qemu else None,
            "guest_ram_mb": mb(split.get("guest_ram", 0)), "tcg_mb": mb(split.get("tcg", 0)),
            "qemu_other_mb": mb(split.get("other", 0)), "keeper_mb": mb(pss_kb(keeper)),
            "total_without_tcg_mb": mb(total - split.get("tcg", 0))}


def pool_memory(st: dict) -> dict:
    ready = [vm_memory(v) for v in st["vms"] if v["state"] == "ready"]
    if not ready:
        return {"ready": 0}
    out = {"ready": len(ready), "host_total_mb": round(sum(r["total_mb"] for r in ready), 1)}
    for key in ready[0]:
        vals = [r[key] for r in ready if r[key] is not None]
        out[f"per_vm_{key}"] = round(statistics.median(vals), 1) if vals else None
    return out


def host_total_mb(st: dict) -> float:
    """PSS of every pooled VM's processes, ready or booting."""
    total = 0
    for v in st["vms"]:
        if v.get("keeper_pid"):
            total += sum(pss_kb(p) for p in [v["keeper_pid"]] + descendants(v["keeper_pid"]))
    return round(total / 1024, 1)


def n_ready(st: dict) -> int:
    return sum(v["state"] == "ready" for v in st["vms"])


def run_pool(variant: dict, size: int, args, log) -> dict:
    nb = private_setup(f"capsem-bench-density-{variant['name']}-")
    env = dict(os.environ, **variant["env"])
    # the claims (this process's provisioner) find the pool's image in the variant's cache
    os.environ.pop("CAPSEM_CACHE_DIR", None)
    if "CAPSEM_CACHE_DIR" in variant["env"]:
        os.environ["CAPSEM_CACHE_DIR"] = variant["env"]["CAPSEM_CACHE_DIR"]
    out = subprocess.run(CLI + ["pool", "start", "--size", str(size), "--memory", str(args.memory),
                                "--cpus", str(args.cpus), "--parallel", "2"], capture_output=True, text=True, env=env)
    if out.returncode:
        raise SystemExit(out.stderr)
    res: dict = {"size": size, "curve": [], "cycles": []}
    try:
        t0 = time.monotonic()
        while True:
            st = pool_status()
            res["curve"].append({"t_s": round(time.monotonic() - t0, 1), "ready": n_ready(st),
                                 "host_mb": host_total_mb(st)})
            if n_ready(st) >= size:
                break
            if time.monotonic() - t0 > args.timeout:
                raise RuntimeError(f"pool of {size} not full after {args.timeout} s: {st}")
            time.sleep(2)
        res["fill_s"] = round(time.monotonic() - t0, 1)
        time.sleep(SETTLE_S)
        res["idle"] = pool_memory(pool_status())
        log(f"{variant['name']} pool of {size}: full after {res['fill_s']} s; idle {res['idle']}")
        for i in range(args.cycles):
            t, km, kc = start_one("capsem", capsem_config(args, True), str(nb))
            pooled = km.provisioner.kernel_vm.info()["pooled"]
            cyc = {"kernel_info_s": round(t, 3), "first_execute_s": round(km.bench_first_execute_s, 3),
                   "pooled": pooled}
            stop(km, kc)
            t1 = time.monotonic()
            while n_ready(pool_status()) < size:
                if time.monotonic() - t1 > args.timeout:
                    raise RuntimeError("the pool did not refill")
                time.sleep(2)
            cyc["refill_s"] = round(time.monotonic() - t1, 1)
            time.sleep(SETTLE_S)
            cyc["memory"] = pool_memory(pool_status())
            res["cycles"].append(cyc)
            log(f"{variant['name']} pool of {size}: cycle {i + 1}: {cyc}")
    finally:
        subprocess.run(CLI + ["pool", "stop"], capture_output=True)
        subprocess.run(["rm", "-rf", str(nb.parent)])
    return res


def med(vals):
    vals = [v for v in vals if isinstance(v, (int, float))]
    return round(statistics.median(vals), 3) if vals else None


def summary(res: dict) -> dict:
    after_cycles = res["cycles"][-1]["memory"] if res["cycles"] else res["idle"]
    return {"per_vm_mb": res["idle"].get("per_vm_total_mb"),
            "per_vm_without_tcg_mb": res["idle"].get("per_vm_total_without_tcg_mb"),
            "per_vm_guest_ram_mb": res["idle"].get("per_vm_guest_ram_mb"),
            "per_vm_tcg_mb": res["idle"].get("per_vm_tcg_mb"),
            "per_vm_qemu_other_mb": res["idle"].get("per_vm_qemu_other_mb"),
            "per_vm_keeper_mb": res["idle"].get("per_vm_keeper_mb"),
            "host_total_mb": res["idle"].get("host_total_mb"),
            "per_vm_after_cycles_mb": after_cycles.get("per_vm_total_mb"),
            "host_total_after_cycles_mb": after_cycles.get("host_total_mb"),
            "claim_kernel_info_s": med(c["kernel_info_s"] for c in res["cycles"]),
            "claim_first_execute_s": med(c["first_execute_s"] for c in res["cycles"]),
            "fill_s": res["fill_s"]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="10,20")
    ap.add_argument("--cycles", type=int, default=3)
    ap.add_argument("--memory", type=int, default=512)
    ap.add_argument("--cpus", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=1800)
    ap.add_argument("--before-tree", default=None, help="code tree of the 'before' pool (e.g. /work/main)")
    ap.add_argument("--before-cache", default=None, help="CAPSEM_CACHE_DIR of the before pool (default: as now)")
    ap.add_argument("--after-cache", default=None, help="CAPSEM_CACHE_DIR of the after pool (default: as now)")
    ap.add_argument("--json", help="write the results here too")
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    here = str(Path(__file__).resolve().parent.parent)
    variants = []
    if args.before_tree:
        tree = str(Path(args.before_tree).resolve())
        env = {"PYTHONPATH": f"{tree}:{tree}/guest-agent"}
        if args.before_cache:
            env["CAPSEM_CACHE_DIR"] = args.before_cache
        variants.append({"name": "before", "tree": tree, "env": env})
    env = {"PYTHONPATH": f"{here}:{here}/guest-agent"}
    if args.after_cache:
        env["CAPSEM_CACHE_DIR"] = args.after_cache
    variants.append({"name": "after", "tree": here, "env": env})

    def log(msg):
        print(f"[{time.strftime('%H:%M:%S')} load {load()}] {msg}", flush=True)

    results: dict = {"args": vars(args), "load_start": load(), "runs": []}
    for size in sizes:
        for v in variants:
            res = run_pool(v, size, args, log)
            results["runs"].append({"variant": v["name"], "tree": v["tree"], **res, "summary": summary(res)})
    results["load_end"] = load()

    print("\n=== host memory per idle pooled VM (PSS, MB; median over the pool) and claim latency ===")
    cols = ("per_vm_mb", "per_vm_without_tcg_mb", "per_vm_guest_ram_mb", "per_vm_tcg_mb", "per_vm_qemu_other_mb",
            "per_vm_keeper_mb", "host_total_mb", "per_vm_after_cycles_mb", "host_total_after_cycles_mb",
            "claim_kernel_info_s", "claim_first_execute_s", "fill_s")
    runs = results["runs"]
    print(f"{'':<28}" + "".join(f"{r['variant'] + ' ' + str(r['size']):>14}" for r in runs))
    for c in cols:
        print(f"{c:<28}" + "".join(f"{str(r['summary'][c]):>14}" for r in runs))
    for size in sizes:
        b = next((r for r in runs if r["size"] == size and r["variant"] == "before"), None)
        a = next(r for r in runs if r["size"] == size and r["variant"] == "after")
        if b:
            ratios = {c: round(a["summary"][c] / b["summary"][c], 2) for c in cols
                      if isinstance(a["summary"][c], (int, float)) and b["summary"][c]}
            print(f"after/before, pool of {size}: {ratios}")
    for r in runs:
        pts = " ".join(f"{p['ready']}:{p['host_mb']:.0f}" for p in r["curve"][::max(1, len(r['curve']) // 12)])
        print(f"curve {r['variant']} {r['size']} (ready VMs: host MB): {pts} ... "
              f"{r['curve'][-1]['ready']}:{r['curve'][-1]['host_mb']:.0f}")
    print(f"load average: start {results['load_start']}, end {results['load_end']}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
