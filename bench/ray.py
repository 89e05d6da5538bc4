"""Capsem sandboxes on a multi-node Ray cluster on this machine (issue 18; tests/ray_world.py).

    flock /tmp/capsem-vm.lock .venv/bin/python bench/ray.py [--n 20] [--nodes 2] [--no-warm] [--rtt 50]

1. cold: N sandboxes (Sandbox(ray_address=...), no pool), N/nodes pinned to each node by its
   `capsem-node-<name>` resource, all started at once (one thread each, released together): time
   to the first and to all ready, and each one's first cell; memory (PSS) per node while all run.
2. warm: the same with a `capsem pool` of N/nodes VMs running in each node (filled first, not
   timed), sandboxes with use_pool=True.
3. round trip: the median of --rtt executes of `pass` on one Ray-placed sandbox and on one local
   sandbox (the same machine, side by side in this run): remote / local.

Needs root (namespaces) and the VM lock; with N=20 it holds the lock for many minutes (20 TCG VMs
on 2 cores): run it rarely. Prints the load average before and after: figures on a shared machine
are noisy, compare ratios within one run.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# run as a script, bench/ is sys.path[0], where this file would shadow the `ray` package
sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(REPO / "tests"))

from ray_world import RayCluster, pss_kib  # noqa: E402


def load() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def start_all(cluster: RayCluster, n: int, use_pool: bool) -> dict:
    """N sandboxes at once, round-robin over the nodes; returns the figures and the sandboxes."""
    from capsem_kernel.sandbox import Sandbox
    names = list(cluster.nodes)
    barrier = threading.Barrier(n + 1)
    results: list[dict] = [{} for _ in range(n)]

    def one(i: int) -> None:
        node = names[i % len(names)]
        r = results[i]
        r["node"] = node
        barrier.wait()
        t0 = time.monotonic()
        try:
            sb = Sandbox(ray_address=cluster.address, node_resources={f"capsem-node-{node}": 0.001},
                         use_pool=use_pool, start_timeout=1800, placement_timeout=600)
            r["sb"] = sb
            r["ready_s"] = time.monotonic() - t0
            out = sb.run_code("print(6 * 7)", timeout=600)
            assert "".join(out.logs.stdout).strip() == "42", out
            r["cell_s"] = time.monotonic() - t0
            r["placed"] = sb.info().get("node")
            r["pooled"] = bool(sb.info().get("pooled"))
        except Exception as exc:  # noqa: BLE001 - one failure is a figure, the rest go on
            r["error"] = f"{type(exc).__name__}: {exc}"[:300]

    threads = [threading.Thread(target=one, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    barrier.wait()
    t_release = time.monotonic()
    for t in threads:
        t.join()
    all_s = time.monotonic() - t_release
    mem = {name: pss_kib(node.pids()) // 1024 for name, node in cluster.nodes.items()}
    ok = [r for r in results if "cell_s" in r]
    fig = {"n": n, "ok": len(ok), "all_done_s": round(all_s, 1),
           "first_ready_s": round(min((r["ready_s"] for r in ok), default=float("nan")), 1),
           "all_ready_s": round(max((r["ready_s"] for r in ok), default=float("nan")), 1),
           "median_ready_s": round(statistics.median([r["ready_s"] for r in ok]), 1) if ok else None,
           "all_first_cell_s": round(max((r["cell_s"] for r in ok), default=float("nan")), 1),
           "pooled": sum(1 for r in ok if r.get("pooled")),
           "per_node": {name: sum(1 for r in ok if r.get("placed") == name) for name in names},
           "pss_mib_per_node": mem,
           "errors": [r["error"] for r in results if "error" in r][:3]}
    for r in results:
        if "sb" in r:
            r["sb"].close()
    return fig


def rtt_ms(sb, count: int) -> float:
    for _ in range(3):
        sb.run_code("pass", timeout=120)
    times = []
    for _ in range(count):
        t0 = time.perf_counter()
        sb.run_code("pass", timeout=120)
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def start_pools(cluster: RayCluster, size: int) -> None:
    threads = []
    for node in cluster.nodes.values():
        argv = node.exec_argv("env", f"CAPSEM_RUNTIME_DIR={node.runtime_dir}", f"CAPSEM_DATA_DIR={node.data_dir}",
                              sys.executable, "-m", "capsem_vm.cli", "pool", "start", "--size", str(size), "--wait")
        import subprocess
        threads.append(threading.Thread(target=subprocess.run, args=(argv,),
                                        kwargs={"timeout": 3600, "capture_output": True}, daemon=True))
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=20)
    ap.add_argument("--nodes", type=int, default=2)
    ap.add_argument("--no-warm", action="store_true", help="skip the warm-pool round")
    ap.add_argument("--rtt", type=int, default=50, help="executes per round-trip median (0: skip)")
    args = ap.parse_args()
    per_node = -(-args.n // args.nodes)
    print(f"load before: {load()}")
    names = tuple("abcdefgh"[: args.nodes])
    cluster = RayCluster(names=names, capsem=per_node)
    cluster.start(timeout=300)
    print(f"cluster of {args.nodes} nodes up in {cluster.timings['start_s']:.1f} s; "
          f"idle PSS per node (Ray only): {({n: pss_kib(x.pids()) // 1024 for n, x in cluster.nodes.items()})} MiB")
    import ray
    os.environ.update(cluster.client_env)
    ray.init(address=cluster.address, logging_level="ERROR", log_to_driver=False)
    try:
        if args.rtt:
            from capsem_kernel.sandbox import Sandbox
            remote = Sandbox(ray_address=cluster.address, use_pool=False, start_timeout=900)
            local = Sandbox(use_pool=False, start_timeout=900)
            try:
                r_ms, l_ms = rtt_ms(remote, args.rtt), rtt_ms(local, args.rtt)
            finally:
                remote.close()
                local.close()
            print(f"execute round trip (median of {args.rtt}): remote {r_ms:.1f} ms, local {l_ms:.1f} ms, "
                  f"ratio {r_ms / l_ms:.2f}")
        cold = start_all(cluster, args.n, use_pool=False)
        print(f"cold: {cold}")
        if not args.no_warm:
            t0 = time.monotonic()
            start_pools(cluster, per_node)
            print(f"warm pools of {per_node} VMs per node filled in {time.monotonic() - t0:.1f} s (not timed below)")
            warm = start_all(cluster, args.n, use_pool=True)
            print(f"warm: {warm}")
            if cold["ok"] and warm["ok"]:
                print(f"all ready: warm {warm['all_ready_s']} s vs cold {cold['all_ready_s']} s "
                      f"(ratio {warm['all_ready_s'] / cold['all_ready_s']:.2f})")
    finally:
        ray.shutdown()
        cluster.stop()
        left = cluster.leftovers()
        print(f"load after: {load()}; leftovers: {left or 'none'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
