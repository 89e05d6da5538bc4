"""Benchmark: the shared folder (VirtioFS) against the guest's own tmpfs and the host disk, in one run.

    .venv/bin/python bench/folder.py [--mib 256] [--files 500] [--runs 3]
                                     [--variant NAME=OPTS ...] [--memory MB] [--cpus N] [--json FILE]

The same workload (WORKLOAD below, plain Python) runs in three places:
  virtiofs   in the guest, in the shared folder (a real capsem_vm VM, the agent's exec), once per
             --variant: a set of virtiofsd options, each in a VM of its own
  tmpfs      in the guest, in a tmpfs mounted for the bench: the emulation ceiling (TCG guest code,
             guest page cache, no device in between)
  host       on the host, in the folder the VM shares (its disk): the physical limit

Workload, each timed on its own:
  seq write   --mib MiB in 1 MiB writes, then fsync (the fsync is inside the time)
  seq read    the same file, after evicting it from the page cache of the side that reads it
              (posix_fadvise DONTNEED; in the guest also drop_caches). For VirtioFS the data is
              then in the host's page cache, which is where it is in real use; for the host row it
              comes from the disk ("host" also has a "read, host cache" row to compare with)
  reread      the same file again, no eviction (whatever cache the side keeps)
  O_DIRECT    seq write+fsync and read again with O_DIRECT (what an application can opt into to
              skip the page cache of its side; "-" where the filesystem refuses it, e.g. tmpfs)
  small files --files files of 4 KiB: create+write+close, then stat each, read each, unlink each

Ratios: virtiofs / guest tmpfs (goal >= 0.8 for sequential I/O, issue 19) and virtiofs / host,
as throughput (MB/s, or files/s for small files: higher is better for both).

A variant is NAME=OPTS, OPTS a comma list for the C virtiofsd that replaces capsem's defaults for
this run only (nothing in capsem_vm changes): `cache=auto|always|none`, `writeback`,
`thread-pool-size=N`, `allow_direct_io`, `no_readdirplus`; and one guest-side setting,
`read_ahead_kb=N` (the share's readahead in the guest, /sys/class/bdi/<dev>/read_ahead_kb). Capsem's own confinement (sandbox,
no_xattr, modcaps, the seccomp filter, the share guard, the idmapped mount) is kept for every
variant. Default: one variant, "default" (capsem's options as shipped).

Everything runs in a private runtime/data/config dir and folder; the load average is printed before
and after (the machine is shared: other sessions and CI runs load the same 2 cores).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "guest-agent")]

# Runs in the guest and on the host: `python3 -c WORKLOAD DIR MIB FILES DROP_CACHES`, prints one
# JSON object of seconds per step.
WORKLOAD = r'''
import json, os, sys, time
d, mib, files, drop = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "1"
out = {}
def evict(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    if drop:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3")
def read_all(path):
    buf = bytearray(1 << 20)
    n = 0
    with open(path, "rb", buffering=0) as f:
        while (k := f.readinto(buf)):
            n += k
    return n
big = os.path.join(d, "bench-seq.bin")
chunk = os.urandom(1 << 20)
t = time.perf_counter()
fd = os.open(big, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
for _ in range(mib):
    os.write(fd, chunk)
os.fsync(fd)
os.close(fd)
out["seq_write_s"] = time.perf_counter() - t
out["reread_host_cache_s"] = None
if not drop:  # the host: its page cache first, then from the disk
    t = time.perf_counter()
    assert read_all(big) == mib << 20
    out["reread_host_cache_s"] = time.perf_counter() - t
evict(big)
t = time.perf_counter()
assert read_all(big) == mib << 20
out["seq_read_s"] = time.perf_counter() - t
t = time.perf_counter()
assert read_all(big) == mib << 20
out["reread_s"] = time.perf_counter() - t
os.unlink(big)
import mmap
def direct_io():
    """Sequential write+fsync and read with O_DIRECT (page-aligned buffer): the page cache of the
    side doing it is bypassed. None where the filesystem refuses O_DIRECT (tmpfs before Linux 6.6)."""
    p, buf = os.path.join(d, "bench-direct.bin"), mmap.mmap(-1, 1 << 20)
    buf.write(chunk)
    try:
        t = time.perf_counter()
        fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DIRECT, 0o644)
        for _ in range(mib):
            os.write(fd, buf)
        os.fsync(fd)
        os.close(fd)
        w = time.perf_counter() - t
        t = time.perf_counter()
        fd, n = os.open(p, os.O_RDONLY | os.O_DIRECT), 0
        while (k := os.readv(fd, [buf])):
            n += k
        os.close(fd)
        assert n == mib << 20
        return w, time.perf_counter() - t
    except OSError:
        return None, None
    finally:
        if os.path.exists(p):
            os.unlink(p)
out["seq_write_direct_s"], out["seq_read_direct_s"] = direct_io()
sub = os.path.join(d, "bench-small")
os.mkdir(sub)
names = [os.path.join(sub, f"f{i:05d}.txt") for i in range(files)]
small = os.urandom(4096)
t = time.perf_counter()
for p in names:
    with open(p, "wb") as f:
        f.write(small)
out["create_s"] = time.perf_counter() - t
t = time.perf_counter()
for p in names:
    os.stat(p)
out["stat_s"] = time.perf_counter() - t
t = time.perf_counter()
for p in names:
    with open(p, "rb") as f:
        f.read()
out["read_small_s"] = time.perf_counter() - t
t = time.perf_counter()
for p in names:
    os.unlink(p)
os.rmdir(sub)
out["unlink_s"] = time.perf_counter() - t
# does a shared writable mapping work here? (FUSE direct I/O refuses it before Linux 6.6)
with open(os.path.join(d, "bench-mmap.bin"), "w+b") as f:
    f.write(small)
    f.flush()
    try:
        mmap.mmap(f.fileno(), 4096, mmap.MAP_SHARED).close()
        out["mmap_shared"] = "ok"
    except OSError as exc:
        out["mmap_shared"] = f"errno {exc.errno}"
os.unlink(os.path.join(d, "bench-mmap.bin"))
print(json.dumps(out))
'''

GUEST_TMPFS = "/run/capsem-bench-tmpfs"
# (key, label, kind): kind "mb" = --mib / seconds, "files" = --files / seconds
ROWS = (("seq_write_s", "seq write + fsync", "mb"), ("seq_read_s", "seq read (evicted)", "mb"),
        ("reread_s", "seq reread (cached)", "mb"), ("seq_write_direct_s", "seq write O_DIRECT", "mb"),
        ("seq_read_direct_s", "seq read O_DIRECT", "mb"), ("create_s", "small: create+write", "files"),
        ("stat_s", "small: stat", "files"), ("read_small_s", "small: read", "files"),
        ("unlink_s", "small: unlink", "files"))
SEQUENTIAL = ("seq_write_s", "seq_read_s")


# ---- pure helpers (tests/test_bench_folder.py) ----

def parse_variant(text: str) -> tuple[str, dict]:
    """"NAME=opt,opt=v" -> (NAME, {"cache": "auto", ...}); "default" alone -> ("default", {})."""
    name, _, opts = text.partition("=")
    if not name or not name.replace("-", "").replace("_", "").isalnum():
        raise ValueError(f"variant name must be a plain word: {text!r}")
    options: dict = {}
    for item in filter(None, opts.split(",")):
        key, eq, value = item.partition("=")
        if key == "cache" and value not in ("auto", "always", "none"):
            raise ValueError(f"cache must be auto, always or none: {item!r}")
        if key == "thread-pool-size" and not value.isdigit():
            raise ValueError(f"thread-pool-size needs a number: {item!r}")
        if key == "read_ahead_kb" and not value.isdigit():
            raise ValueError(f"read_ahead_kb needs a number: {item!r}")
        if key not in ("cache", "writeback", "thread-pool-size", "allow_direct_io", "no_readdirplus",
                       "read_ahead_kb"):
            raise ValueError(f"unknown virtiofsd option {key!r} (see --help)")
        options[key] = value if eq else True
    return name, options


def apply_options(argv: list[str], options: dict) -> list[str]:
    """The C virtiofsd's argv (capsem_vm.virtiofs.virtiofsd_args) with `options` applied."""
    out = list(argv)
    if "cache" in options:
        i = out.index("cache=auto")
        out[i] = f"cache={options['cache']}"
    for flag in ("writeback", "allow_direct_io", "no_readdirplus"):
        if options.get(flag):
            out += ["-o", flag]
    if "thread-pool-size" in options:
        out.append(f"--thread-pool-size={options['thread-pool-size']}")
    return out


def rate(key: str, seconds: float, mib: int, files: int) -> float:
    """MB/s (10^6 bytes) for sequential rows, files/s for small-file rows."""
    kind = dict((k, kd) for k, _, kd in ROWS)[key]
    return (mib * (1 << 20) / 1e6 if kind == "mb" else files) / seconds


def medians(runs: list[dict]) -> dict:
    """Per step, the median seconds of `runs` (steps without a number left out)."""
    return {k: statistics.median(r[k] for r in runs) for k in runs[0] if isinstance(runs[0][k], (int, float))}


def table(results: dict, mib: int, files: int) -> str:
    """Three blocks, one column per place: throughput (host, guest tmpfs, each VirtioFS variant),
    then each variant / guest tmpfs and each variant / host (throughput ratios: higher is better)."""
    host, tmpfs = medians(results["host"]), medians(results["tmpfs"])
    variants = {name: medians(runs) for name, runs in results["virtiofs"].items() if runs}
    w = 11

    def block(title: str, cols: list[str], cell) -> list[str]:
        out = [title, f"{'':24}" + "".join(f"{c[:w - 1]:>{w}}" for c in cols)]
        for key, label, _ in ROWS:
            out.append(f"{label:24}" + "".join(cell(c, key) for c in cols))
        return out

    places = {"host": host, "tmpfs": tmpfs, **variants}

    def thr(col: str, key: str) -> str:
        s = places[col].get(key)
        return f"{rate(key, s, mib, files):{w}.1f}" if s else f"{'-':>{w}}"

    def ratio(base: dict):
        def cell(col: str, key: str) -> str:
            v, b = variants[col].get(key), base.get(key)
            return f"{b / v:{w}.2f}" if v and b else f"{'-':>{w}}"  # throughput ratio = time ratio inverted
        return cell
    lines = block("throughput (MB/s for seq rows, files/s for small-file rows; median of runs)",
                  list(places), thr)
    firsts = [results["host"][0], results["tmpfs"][0]] + [results["virtiofs"][n][0] for n in variants]
    lines.append(f"{'mmap MAP_SHARED':24}" + "".join(f"{str(r.get('mmap_shared', '-')):>{w}}" for r in firsts))
    if "reread_host_cache_s" in host:
        lines.append(f"{'(host: read, host cache':24}"
                     f"{rate('seq_read_s', host['reread_host_cache_s'], mib, files):{w}.1f} MB/s)")
    lines += [""] + block("VirtioFS / guest tmpfs (goal >= 0.8 for the seq rows)", list(variants), ratio(tmpfs))
    lines += [""] + block("VirtioFS / host disk", list(variants), ratio(host))
    return "\n".join(lines)


def sequential_ratio(results: dict, variant: str, mib: int) -> dict:
    """VirtioFS / guest tmpfs for the sequential rows (the issue's goal: >= 0.8)."""
    tmpfs, v = medians(results["tmpfs"]), medians(results["virtiofs"][variant])
    return {k: tmpfs[k] / v[k] for k in SEQUENTIAL}


# ---- running it ----

async def guest_run(vm, path: str, args) -> dict:
    proc = await vm.control.exec(["python3", "-c", WORKLOAD, path, str(args.mib), str(args.files), "1"])
    out, err = bytearray(), bytearray()
    async for fd, data in proc.output():
        (err if fd == 2 else out).extend(data)
    if proc.result.code != 0:
        raise RuntimeError(f"guest workload in {path} failed: {bytes(err).decode(errors='replace')[-2000:]}")
    return json.loads(out)


async def guest_sh(vm, script: str) -> None:
    proc = await vm.control.exec(["sh", "-c", script])
    err = bytearray()
    async for fd, data in proc.output():
        err.extend(data)
    if proc.result.code != 0:
        raise RuntimeError(f"guest: {script}: {bytes(err).decode(errors='replace')}")


def host_run(folder: Path, args) -> dict:
    out = subprocess.run([sys.executable, "-c", WORKLOAD, str(folder), str(args.mib), str(args.files), "0"],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


async def run_variant(name: str, options: dict, folder: Path, args, results: dict, log) -> None:
    from capsem_vm import virtiofs
    from capsem_vm.config import Share, VMConfig
    from capsem_vm.vm import VM
    shipped = virtiofs.virtiofsd_args
    def patched(*a, **kw):
        argv = apply_options(shipped(*a, **kw), options)
        results.setdefault("virtiofsd_argv", {})[name] = argv
        return argv
    virtiofs.virtiofsd_args = patched
    try:
        async with VM(VMConfig(memory_mb=args.memory, cpus=args.cpus, shares=(Share(folder, "bench"),))) as vm:
            if "tmpfs" not in results:  # measured once, in the first VM
                await guest_sh(vm, f"mkdir -p {GUEST_TMPFS} && mount -t tmpfs -o size={args.mib + 64}m tmpfs {GUEST_TMPFS}")
                results["tmpfs"] = []
                for i in range(args.runs):
                    results["tmpfs"].append(await guest_run(vm, GUEST_TMPFS, args))
                    log(f"guest tmpfs {i + 1}/{args.runs}: {fmt_run(results['tmpfs'][-1])}")
            if "read_ahead_kb" in options:  # the guest side: the share's FUSE bdi readahead
                await guest_sh(vm, f'echo {options["read_ahead_kb"]} > /sys/class/bdi/$(mountpoint -d {folder})/read_ahead_kb')
            runs = results["virtiofs"].setdefault(name, [])
            for i in range(args.runs):
                try:
                    runs.append(await guest_run(vm, str(folder), args))
                except Exception as exc:  # a variant that kills virtiofsd: say why, go on with the next
                    log(f"virtiofs[{name}] {i + 1}/{args.runs} FAILED: {exc}\n{vm.diagnostics()}")
                    results.setdefault("failed", {})[name] = f"{exc}\n{vm.diagnostics()}"
                    break
                log(f"virtiofs[{name}] {i + 1}/{args.runs}: {fmt_run(runs[-1])}")
    finally:
        virtiofs.virtiofsd_args = shipped


def fmt_run(r: dict) -> str:
    return ", ".join(f"{k.removesuffix('_s')} {v:.3f}s" if isinstance(v, float) else f"{k} {v}"
                     for k, v in r.items() if v is not None)


def main() -> int:
    from capsem_vm.config import DEFAULT_CPUS, DEFAULT_MEMORY_MB
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="\n\n".join(__doc__.split("\n\n")[2:]))
    ap.add_argument("--mib", type=int, default=256, help="size of the sequential file (MiB)")
    ap.add_argument("--files", type=int, default=500, help="number of small files")
    ap.add_argument("--runs", type=int, default=3, help="runs of the workload in each place (median)")
    ap.add_argument("--variant", action="append", metavar="NAME=OPTS",
                    help="virtiofsd options to try, each in its own VM (repeatable; default: 'default', "
                         "capsem's shipped options), e.g. always=cache=always wb=writeback tp4=thread-pool-size=4")
    ap.add_argument("--memory", type=int, default=DEFAULT_MEMORY_MB, help="guest memory (MB)")
    ap.add_argument("--cpus", type=int, default=DEFAULT_CPUS, help="guest vCPUs")
    ap.add_argument("--json", metavar="FILE", help="also write the raw numbers here")
    args = ap.parse_args()
    variants = [parse_variant(v) for v in (args.variant or ["default"])]
    if args.memory < 2 * args.mib + 256:
        ap.error(f"--memory must hold the tmpfs file and the page cache: at least {2 * args.mib + 256} MB")

    def log(msg: str) -> None:
        print(f"[{datetime.datetime.now():%H:%M:%S} load {os.getloadavg()[0]:.2f}] {msg}", flush=True)

    with tempfile.TemporaryDirectory(prefix="capsem-bench-folder-") as tmp:
        for name in ("rt", "data", "config", "work"):
            (Path(tmp) / name).mkdir(mode=0o700)
        os.environ.update(CAPSEM_RUNTIME_DIR=f"{tmp}/rt", CAPSEM_DATA_DIR=f"{tmp}/data",
                          CAPSEM_CONFIG_DIR=f"{tmp}/config")
        folder = Path(tmp) / "work"
        results: dict = {"args": vars(args), "load_before": os.getloadavg(), "cpus": os.cpu_count(),
                         "host": [], "virtiofs": {}, "variants": dict(variants)}
        log(f"load average before: {results['load_before']}; guest {args.memory} MB, {args.cpus} vCPU; "
            f"{args.mib} MiB, {args.files} files, {args.runs} runs; folder on {fs_type(folder)}")
        for i in range(args.runs):
            results["host"].append(host_run(folder, args))
            log(f"host {i + 1}/{args.runs}: {fmt_run(results['host'][-1])}")
        for name, options in variants:
            asyncio.run(run_variant(name, options, folder, args, results, log))
        results["load_after"] = os.getloadavg()
    print()
    print(table(results, args.mib, args.files))
    for name, _ in variants:
        if not results["virtiofs"].get(name):
            print(f"[{name}] failed: {results.get('failed', {}).get(name, '?').splitlines()[0]}")
            continue
        seq = sequential_ratio(results, name, args.mib)
        results.setdefault("sequential_vs_tmpfs", {})[name] = seq
        print(f"goal VirtioFS >= 0.8 x guest tmpfs, sequential [{name}]: write {seq['seq_write_s']:.2f}, "
              f"read {seq['seq_read_s']:.2f}")
    print(f"load average after: {results['load_after']}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")
    return 0


def fs_type(path: Path) -> str:
    out = subprocess.run(["df", "--output=fstype,source", str(path)], capture_output=True, text=True)
    return " ".join(out.stdout.split()[2:]) or "?"


if __name__ == "__main__":
    sys.exit(main())
