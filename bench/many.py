"""Benchmark: many capsem kernels started at once (issue 19, goal 3), beside as many local ipykernels.

    python bench/many.py [--kernels 20] [--pool 10] [--memory 512] [--cpus N] [--json F] [--md F]

1. a pool of --pool warm VMs (`capsem pool start --parallel 2`), filled and idle (its PSS noted);
2. local: --kernels local ipykernels ("python3") started together, the baseline;
3. capsem: --kernels capsem kernels (use_pool) started together: --pool of them claim pooled VMs,
   the others find the pool empty and boot cold (the pool refills meanwhile, as it would).
Each kernel is started the way jupyter_client's users do (KernelManager.start_kernel, start_channels,
wait_for_ready), in a notebook folder of its own, and runs one cell that writes a file there and
prints the cwd; the output and the file (read on the host) are checked.

Printed (bench/fleet.py measures): time to all ready and to all cells run, the per-kernel median of
each (pooled and cold apart), ratios capsem/local; the host's responsiveness (a 10 ms sleep loop in
a process of its own: worst and p99 lateness); host memory: the peak of PSS summed over every
capsem process (QEMU, vsock backends, virtiofsd, keepers, the pool service, the proxy service when
it runs, and this process, which holds the kernel managers and channel relays), by kind; and the
MemAvailable low-water mark. Goal: all ready, PSS < 20 GiB. The load average before and after.

Holds the host for minutes (10 cold TCG boots on 2 cores): under the shared VM lock,
`flock /tmp/capsem-vm.lock python bench/many.py`, or `make many`.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "guest-agent"), str(Path(__file__).parent)]

import fleet  # noqa: E402
from capsem_vm.config import DEFAULT_CPUS  # noqa: E402
from start import CLI, capsem_config, load, pool_status, private_setup, wait_ready  # noqa: E402

GOAL_PSS_MB = 20 * 1024


def cell_for(folder: Path, i: int, url: str | None = None) -> tuple[str, callable]:
    """A cell that writes a file in its folder and prints the cwd (and, with `url`, fetches it:
    through the policy proxy in a capsem kernel)."""
    code = f"import os; open('hello.txt', 'w').write('kernel {i}'); print(os.getcwd())"
    want = str(folder)
    if url:
        code += f"\nimport urllib.request; print(urllib.request.urlopen('{url}/k{i}', timeout=600).read().decode())"
        want += f"\n{BODY} /k{i}"

    def check(out: str) -> bool:
        return out.strip() == want and (folder / "hello.txt").read_text() == f"kernel {i}"
    return code, check


BODY = "capsem-many upstream"


def upstream(base: Path) -> tuple[str, Path, object]:
    """An HTTP server on this machine's own address (never loopback: the policy protects it) that
    answers BODY and the path, and a policy that allows exactly it. Returns (url, policy, server)."""
    import http.server
    import threading
    ip = subprocess.run(["hostname", "-I"], capture_output=True, text=True).stdout.split()[0]

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = f"{BODY} {self.path}".encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *a):
            pass
    srv = http.server.ThreadingHTTPServer((ip, 0), Handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    port = srv.server_address[1]
    policy = base / "policy.toml"
    policy.write_text(f'[[rule]]\nname = "bench-upstream"\nhost = "{ip}"\nport = {port}\n'
                      f'addresses = ["{ip}"]\naction = "allow"\nreason = "bench/many.py upstream"\n')
    return f"http://{ip}:{port}", policy, srv


def folders(base: Path, label: str, n: int) -> list[Path]:
    out = []
    for i in range(n):
        d = base / f"{label}-{i:02d}"
        d.mkdir()
        out.append(d)
    return out


def note_pooled(km, marks: fleet.Marks) -> None:
    kvm = km.provisioner.kernel_vm
    marks.info["group"] = "pooled" if kvm is not None and kvm.pooled else "cold"
    if kvm is not None:  # where a VM's start went (QEMU -> hello, the whole VM start, the claim)
        t = kvm.vm.timings
        marks.info["vm"] = {k: round(v, 2) for k, v in t.items() if k in ("hello_s", "ready_s", "pool_claim_s",
                                                                         "egress_s", "attach_s", "mount_s")}


def pool_pid() -> int | None:
    try:
        return pool_status().get("pid")
    except Exception:  # noqa: BLE001 - no pool
        return None


def run(args) -> dict:
    nb = private_setup("capsem-bench-many-")
    base = nb.parent
    res: dict = {"args": vars(args), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                 "load_start": load(), "mem_available_start_mb": fleet.mem_available_kb() // 1024}

    def log(msg):
        print(f"[{time.strftime('%H:%M:%S')} load {load()}] {msg}", flush=True)

    need = args.kernels * args.memory * 1.2
    if fleet.mem_available_kb() / 1024 < need + 2048 and not args.force:
        raise SystemExit(f"MemAvailable {fleet.mem_available_kb() // 1024} MB < {need + 2048:.0f} MB needed "
                         f"for {args.kernels} VMs of {args.memory} MB (+2 GiB): --force to try anyway")
    log(f"MemAvailable {res['mem_available_start_mb']} MB")

    url = None
    if args.egress:  # every kernel registered with the proxy service, every cell fetches through it
        url, policy, _srv = upstream(base)
        res["upstream"] = url
    out = subprocess.run(CLI + ["pool", "start", "--size", str(args.pool), "--memory", str(args.memory),
                                "--cpus", str(args.cpus), "--parallel", "2"], capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(out.stderr)
    try:
        t = time.monotonic()
        if args.pool:
            wait_ready(args.pool)
        res["pool_fill_s"] = round(time.monotonic() - t, 1)
        ppid = pool_pid()
        time.sleep(3)  # the last boot's refill pause and prewarm settle
        idle = fleet.memory_sample(fleet.tree_pids(*([ppid] if ppid else [])))
        res["pool_idle"] = idle
        log(f"pool of {args.pool} full after {res['pool_fill_s']} s; idle {idle}")

        # local baseline: the same number, together, with the pool idle beside them
        local_dirs = folders(base, "local", args.kernels)
        starts = []
        for i, d in enumerate(local_dirs):
            code, check = cell_for(d, i, url)
            starts.append(fleet.jupyter_start("python3", None, str(d), code, check))
        log(f"local: {args.kernels} ipykernels at once")
        local = fleet.run_fleet(starts, pids=fleet.tree_pids, sample_s=args.sample)
        res["local"] = {"summary": local.summary(), "kernels": local.kernels, "watch": local.watch}
        print(fleet.format_summary("local ipykernel", res["local"]["summary"]), flush=True)

        # capsem: from the pool (as many as it holds), the rest cold
        capsem_dirs = folders(base, "capsem", args.kernels)
        starts = []
        for i, d in enumerate(capsem_dirs):
            code, check = cell_for(d, i, url)
            config = capsem_config(args, True)
            if url:
                config.CapsemProvisioner.policy = str(policy)
            starts.append(fleet.jupyter_start("capsem", config, str(d), code, check,
                                              on_started=note_pooled))
        log(f"capsem: {args.kernels} kernels at once ({args.pool} pooled VMs ready)")
        cap = fleet.run_fleet(starts, pids=lambda: fleet.tree_pids(*([ppid] if ppid else [])),
                              sample_s=args.sample, settle_s=args.settle)
        res["capsem"] = {"summary": cap.summary(), "kernels": cap.kernels, "watch": cap.watch}
        print(fleet.format_summary("capsem", res["capsem"]["summary"]), flush=True)
        try:
            res["pool_after"] = {k: pool_status()[k] for k in ("claims", "claimed_alive")}
        except Exception as exc:  # noqa: BLE001
            res["pool_after"] = repr(exc)
    finally:
        subprocess.run(CLI + ["pool", "stop"], capture_output=True)
        subprocess.run(["rm", "-rf", str(base)])
    res["load_end"] = load()
    res["mem_available_end_mb"] = fleet.mem_available_kb() // 1024
    return res


def ratios(res: dict) -> dict:
    lo, ca = res["local"]["summary"], res["capsem"]["summary"]
    out = {}
    for key in ("all_ready_s", "all_cell_s"):
        if lo.get(key) and ca.get(key):
            out[key] = round(ca[key] / lo[key], 2)
    lm = lo["median_s"].get("all", {})
    for g, med in ca["median_s"].items():
        for m in ("ready", "cell"):
            if med.get(m) and lm.get(m):
                out[f"median_{m}_{g}"] = round(med[m] / lm[m], 2)
    return out


def verdict(res: dict) -> dict:
    ca = res["capsem"]["summary"]
    return {"all_ready_and_ran_a_cell": ca["ok"] == ca["n"],
            "pss_below_20_gib": ca["peak_pss_mb"] is not None and ca["peak_pss_mb"] < GOAL_PSS_MB,
            "pooled": ca["counts"].get("pooled", 0), "cold": ca["counts"].get("cold", 0)}


def markdown(res: dict) -> str:
    a = res["args"]
    lo, ca = res["local"]["summary"], res["capsem"]["summary"]
    r, v = res["ratios"], res["verdict"]

    def row(label, s, key):
        return f"| {label} | {s.get(key)} |"
    lines = [f"# {a['kernels']} kernels at once (bench/many.py), {res['date']}", "",
             f"Host: 2 cores, TCG, {res['mem_available_start_mb']} MB available at start. Pool of {a['pool']} "
             f"VMs of {a['memory']} MB / {a['cpus']} CPU(s), filled in {res['pool_fill_s']} s; idle pool PSS "
             f"{res['pool_idle']['pss_mb']} MB ({res['pool_idle']['by_kind_mb']}). Load average: start "
             f"{res['load_start']}, end {res['load_end']}.", "",
             f"Verdict: all ready and ran a cell: **{v['all_ready_and_ran_a_cell']}** ({ca['ok']}/{ca['n']}; "
             f"{v['pooled']} pooled, {v['cold']} cold); peak PSS < 20 GiB: **{v['pss_below_20_gib']}** "
             f"({ca['peak_pss_mb']} MB).", "",
             "| | local ipykernel | capsem | capsem/local |", "|---|---|---|---|"]
    for key, label in (("all_ready_s", "time to all ready (s)"), ("all_cell_s", "time to all cells run (s)")):
        lines.append(f"| {label} | {lo.get(key)} | {ca.get(key)} | {r.get(key)} |")
    lm = lo["median_s"].get("all", {})
    for g, med in ca["median_s"].items():
        for m in ("ready", "cell"):
            lines.append(f"| median per kernel, {m} ({g}, n={ca['counts'][g]}) (s) | {lm.get(m)} | {med.get(m)} | "
                         f"{r.get(f'median_{m}_{g}')} |")
    for key in ("worst_ms", "p99_ms", "p50_ms"):
        lines.append(f"| timer lateness {key[:-3]} (ms, 10 ms sleeps) | {lo['lateness_ms'].get(key):.1f} | "
                     f"{ca['lateness_ms'].get(key):.1f} | |")
    lines.append(f"| peak PSS (MB) | {lo['peak_pss_mb']} | {ca['peak_pss_mb']} | |")
    lines.append(f"| MemAvailable low-water (MB) | {lo['mem_available_low_mb']} | {ca['mem_available_low_mb']} | |")
    lines.append(f"| open fds of the client process, peak | {lo['peak_fds']} | {ca['peak_fds']} | |")
    lines.append(f"| stop all (s) | {lo['stop_s']} | {ca['stop_s']} | |")
    lines += ["", f"capsem peak PSS by kind (MB): {ca['peak_by_kind_mb']}; processes: {ca['peak_processes']}"]
    if ca["errors"]:
        lines += ["", "Errors:"] + [f"- {e[:500]}" for e in ca["errors"]]
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kernels", type=int, default=20, help="kernels started at once (default 20)")
    ap.add_argument("--pool", type=int, default=10, help="warm VMs in the pool (default 10)")
    ap.add_argument("--memory", type=int, default=512, help="guest MB (default 512)")
    ap.add_argument("--cpus", type=int, default=DEFAULT_CPUS, help=f"vCPUs per VM (default {DEFAULT_CPUS}, the kernelspec's)")
    ap.add_argument("--sample", type=float, default=1.0, help="memory sample interval (s)")
    ap.add_argument("--settle", type=float, default=5.0, help="idle seconds measured after all cells ran")
    ap.add_argument("--egress", action="store_true",
                    help="each cell also fetches from a server on this host's address, capsem kernels through the "
                         "policy proxy (a policy allowing exactly it: the proxy service serves all kernels)")
    ap.add_argument("--force", action="store_true", help="run even if MemAvailable looks too low")
    ap.add_argument("--json", help="write the results here (default: none)")
    ap.add_argument("--md", help="write the markdown table here (default: none)")
    args = ap.parse_args()
    res = run(args)
    res["ratios"] = ratios(res)
    res["verdict"] = verdict(res)
    print(f"\nratios capsem/local: {res['ratios']}")
    print(f"verdict: {res['verdict']}")
    print(f"load average: start {res['load_start']}, end {res['load_end']}")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1, default=str))
    if args.md:
        Path(args.md).write_text(markdown(res))
    return 0 if res["verdict"]["all_ready_and_ran_a_cell"] and res["verdict"]["pss_below_20_gib"] else 1


if __name__ == "__main__":
    sys.exit(main())
