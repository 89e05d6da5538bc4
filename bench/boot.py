"""Cold-boot benchmark: QEMU start -> agent hello with the real image, against the floor.

    .venv/bin/python bench/boot.py [--runs 5] [--memory MB] [--cpus N] [--image DIR] [--json FILE]

real   capsem_vm.vm.VM with the image: QEMU start -> the agent's hello (VM.timings["hello_s"]),
       broken down with the guest uptimes the hello carries (kernel reached /init, /init handed
       over, hello sent) and the host's image verification before QEMU starts.
floor  the same kernel and the same QEMU command line (capsem_vm.qemu.build_command, same devices,
       same vsock helper, same kernel command line) with a bare busybox initramfs whose /init
       prints a marker on the serial console and powers off: QEMU start -> marker seen in the
       console log.

The two kinds alternate (real, floor, floor, real, ...) so that load from other processes on this
shared host hits both alike. Target: real/floor <= 1.3. Also reported: host memory per idle VM
(QEMU + helpers, from /proc: RSS and PSS, PSS counting the guest RAM memfd that QEMU shares with
vhost-device-vsock only once), sampled IDLE_S after hello.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import io
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "guest-agent")]

from capsem_vm import vm as vm_module  # noqa: E402
from capsem_vm.accel import choose as choose_accel  # noqa: E402
from capsem_vm.config import VMConfig  # noqa: E402
from capsem_vm.errors import VMError  # noqa: E402
from capsem_vm.image import initramfs  # noqa: E402
from capsem_vm.image.cpio import NewcWriter  # noqa: E402
from capsem_vm.image.manifest import ASSET_FILES, write_manifest_for  # noqa: E402
from capsem_vm.image.store import resolve_image  # noqa: E402
from capsem_vm.image.verify import read_manifest  # noqa: E402
from capsem_vm.vm import VM  # noqa: E402

MARKER = b"CAPSEM-FLOOR-MARKER"
IDLE_S = 2.0  # how long a booted VM idles before its memory is sampled
POLL_S = 0.002  # console log polling interval for the floor marker

FLOOR_INIT = f"""#!/bin/sh
echo {MARKER.decode()}
/bin/busybox mount -t proc proc /proc && read -r up _ </proc/uptime && echo "floor-uptime $up"
/bin/busybox poweroff -f
""".encode()


def build_floor_initrd(path: Path) -> Path:
    """A bare busybox initramfs (from busybox-static), compressed like the real one."""
    busybox = initramfs.check_busybox()
    buf = io.BytesIO()
    w = NewcWriter(buf)
    for d in ("bin", "dev", "proc"):
        w.directory(d)
    w.char_device("dev/console", 5, 1)
    w.file("bin/busybox", busybox.read_bytes(), 0o755)
    w.symlink("bin/sh", "busybox")
    w.file("init", FLOOR_INIT, 0o755)
    w.close()
    path.write_bytes(initramfs.compress(buf.getvalue(), initramfs.COMPRESSION, None))
    os.chmod(path, 0o644)
    return path


@contextlib.contextmanager
def floor_image(image: str | None):
    """An image with the real image's kernel and rootfs and the bare initramfs: VM boots it with
    exactly the devices, flags and helpers of a real boot."""
    real = resolve_image(image)
    manifest, _ = read_manifest(real)
    with tempfile.TemporaryDirectory(prefix="capsem-floor-") as tmp:
        d = Path(tmp)
        os.chmod(d, 0o755)
        for name in ("kernel", "rootfs"):
            src, dst = real / ASSET_FILES[name], d / ASSET_FILES[name]
            try:
                os.link(src, dst)
            except OSError:
                shutil.copyfile(src, dst)
                os.chmod(dst, 0o644)
        build_floor_initrd(d / ASSET_FILES["initrd"])
        write_manifest_for(d, kernel_version=manifest["kernel_version"], recipe={})
        yield d


# VM.timings has QEMU start -> hello for real boots; a floor boot never says hello, so note when
# VM spawns QEMU (the same instant VM measures from).
_qemu_started: list[float] = []
_spawn = vm_module.spawn


async def _timed_spawn(name, *args, **kwargs):
    if name == "qemu":
        _qemu_started.append(time.monotonic())
    return await _spawn(name, *args, **kwargs)


vm_module.spawn = _timed_spawn


def cpu_seconds(pid: int) -> float | None:
    """user + system CPU time of a process: the work done, whatever the load on this host."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def memory_of(pids: list[int]) -> dict[str, float]:
    """Sum of RSS and PSS (MiB) over the given processes, from /proc/<pid>/smaps_rollup."""
    rss = pss = 0
    for pid in pids:
        try:
            text = Path(f"/proc/{pid}/smaps_rollup").read_text()
        except OSError:
            continue
        for line in text.splitlines():
            key, _, rest = line.partition(":")
            if key == "Rss":
                rss += int(rest.split()[0])
            elif key == "Pss":
                pss += int(rest.split()[0])
    return {"rss_mib": rss / 1024, "pss_mib": pss / 1024}


async def boot_real(config: VMConfig) -> dict:
    vm = VM(config)
    try:
        await vm.start()
        cpu = cpu_seconds(vm.qemu.pid)
        boot = vm.hello.get("boot") or {}
        # The agent serves right after its hello: one exec round trip (`true`) as the proof.
        t0 = time.monotonic()
        proc = await vm.control.exec(["true"])
        async for _ in proc.output():
            pass
        assert (await proc.wait()).code == 0
        exec_s = time.monotonic() - t0
        await asyncio.sleep(IDLE_S)
        pids = [p.pid for p in [vm.qemu, *vm.helpers]]
        return {"hello_s": vm.timings["hello_s"], "verify_s": vm.timings["verify_s"], "exec_s": exec_s,
                **{k: boot.get(k) for k in ("kernel_s", "init_s", "python_s", "imports_s", "agent_s")},
                "qemu_cpu_s": cpu, "helpers": len(pids) - 1, **memory_of(pids)}
    finally:
        await vm.stop()


async def boot_floor(config: VMConfig, image: Path) -> dict:
    vm = VM(dataclasses.replace(config, image=str(image)))
    start = asyncio.ensure_future(vm.start())
    seen = uptime = cpu = None
    console = b""
    try:
        deadline = time.monotonic() + config.boot_timeout
        while uptime is None:  # the marker, then the uptime line, then power-off
            if vm.qemu is not None and vm.paths is not None:
                try:
                    console = vm.paths.console_log.read_bytes()
                except FileNotFoundError:
                    pass
                if seen is None and MARKER in console:
                    seen = time.monotonic() - _qemu_started[-1]
                    cpu = cpu_seconds(vm.qemu.pid)
                for line in console.decode(errors="replace").splitlines():
                    if line.startswith("floor-uptime "):
                        uptime = float(line.split()[1])
            if start.done() and uptime is None:
                if seen is not None:
                    break
                start.result()  # raises why the VM ended
                raise RuntimeError("the floor VM said hello?")
            if time.monotonic() > deadline:
                raise RuntimeError(f"floor marker not seen within {config.boot_timeout:.0f} s")
            await asyncio.sleep(POLL_S)
        return {"marker_s": seen, "init_uptime_s": uptime, "qemu_cpu_s": cpu}
    finally:
        if not start.done():
            with contextlib.suppress(VMError, asyncio.TimeoutError):
                await asyncio.wait_for(start, 30)  # QEMU exits when the floor powers off
        with contextlib.suppress(BaseException):
            start.result()
        await vm.stop()


def med(rows: list[dict], key: str) -> float | None:
    vals = [r[key] for r in rows if r.get(key) is not None]
    return statistics.median(vals) if vals else None


def runs(rows: list[dict], key: str) -> str:
    return ", ".join(f"{r[key]:.2f}" for r in rows)


def fmt(v: float | None, unit: str = "s") -> str:
    return "   n/a" if v is None else f"{v:6.2f} {unit}"


def stages(r: dict) -> dict:
    """One real boot's stages (s), from the guest uptimes in hello and the host's clock."""
    out = {"pre_kernel": r["hello_s"] - r["agent_s"], "kernel": r["kernel_s"], "init": r["init_s"] - r["kernel_s"]}
    if r.get("python_s") is not None and r.get("imports_s") is not None:
        out.update(python=r["python_s"] - r["init_s"], imports=r["imports_s"] - r["python_s"],
                   connect=r["agent_s"] - r["imports_s"])
    else:  # an agent without the finer marks
        out["agent"] = r["agent_s"] - r["init_s"]
    return out


LABELS = {
    "pre_kernel": "QEMU + firmware + kernel load (hello - guest uptime at hello)",
    "kernel": "kernel boot to /init (guest uptime at /init)",
    "init": "/init: modules, root mount, handover",
    "python": "Python start -> agent code runs",
    "imports": "agent imports (service modules)",
    "connect": "system setup wait, connect, hello",
    "agent": "agent: Python start -> hello",
}


def report(real: list[dict], floor: list[dict], load: tuple[float, float], args) -> dict:
    st = [stages(r) for r in real if None not in (r["kernel_s"], r["init_s"], r["agent_s"])]
    m_real, m_floor = med(real, "hello_s"), med(floor, "marker_s")
    ratio = m_real / m_floor if m_real and m_floor else None
    cpu_r, cpu_f = med(real, "qemu_cpu_s"), med(floor, "qemu_cpu_s")
    print(f"\ncapsem cold boot: {len(real)} real + {len(floor)} floor boots, alternated; {args.memory} MB, "
          f"{args.cpus} vCPU, accel {choose_accel(args.accel).accel}; load average {load[0]:.1f} -> {load[1]:.1f}")
    print(f"  real : QEMU start -> agent hello   median {fmt(m_real)}   (runs: {runs(real, 'hello_s')})")
    print(f"    before QEMU: image verification (host)            {fmt(med(real, 'verify_s'))}")
    print(f"    after hello: first exec round trip (`true`)       {fmt(med(real, 'exec_s'))}")
    for key, label in LABELS.items():
        if any(key in s for s in st):
            print(f"    {label:<72s} {fmt(med(st, key))}")
    print(f"  floor: QEMU start -> /init marker  median {fmt(m_floor)}   (runs: {runs(floor, 'marker_s')}; "
          f"guest uptime at /init {fmt(med(floor, 'init_uptime_s'))})")
    print(f"  QEMU CPU time (user+sys: the work done, whatever the load): real {fmt(cpu_r)}, floor {fmt(cpu_f)}"
          + (f", ratio {cpu_r / cpu_f:.2f}x" if cpu_r and cpu_f else ""))
    print(f"  ratio real/floor: {ratio:.2f}x (target <= 1.30x)" if ratio else "  ratio: n/a")
    helpers = int(med(real, "helpers") or 0)
    print(f"  host memory per idle VM ({IDLE_S:.0f} s after hello; QEMU + {helpers} helper"
          f"{'s' if helpers != 1 else ''}): RSS {fmt(med(real, 'rss_mib'), 'MiB')}, "
          f"PSS {fmt(med(real, 'pss_mib'), 'MiB')}")
    return {"real": real, "floor": floor, "median_real_s": m_real, "median_floor_s": m_floor,
            "ratio": ratio, "load": load, "memory_mb": args.memory, "cpus": args.cpus}


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=5, help="boots of each kind (default 5)")
    ap.add_argument("--memory", type=int, default=VMConfig.memory_mb, help="guest MB (default: VMConfig's)")
    ap.add_argument("--cpus", type=int, default=VMConfig.cpus, help="vCPUs (default: VMConfig's)")
    ap.add_argument("--accel", default="auto")
    ap.add_argument("--image", default=None, help="image dir or name (default: the default image)")
    ap.add_argument("--kernel-arg", action="append", default=[], help="extra kernel argument (both kinds)")
    ap.add_argument("--json", type=Path, help="also write all samples here")
    args = ap.parse_args()
    config = VMConfig(memory_mb=args.memory, cpus=args.cpus, accel=args.accel, image=args.image,
                      kernel_args=tuple(args.kernel_arg))
    real, floor = [], []
    load0 = os.getloadavg()[0]
    with floor_image(args.image) as floor_dir:
        for i in range(args.runs):
            for kind in (("real", "floor") if i % 2 == 0 else ("floor", "real")):
                if kind == "real":
                    r = await boot_real(config)
                    real.append(r)
                    print(f"run {i + 1} real : hello {r['hello_s']:.2f} s (then exec {r['exec_s']:.2f} s; "
                          f"verify {r['verify_s']:.2f} s; guest "
                          + ", ".join(f"{k} {r[k]}" for k in ("kernel_s", "init_s", "python_s", "imports_s",
                                                            "agent_s") if r.get(k) is not None)
                          + f"; QEMU CPU {r['qemu_cpu_s']:.2f} s; RSS {r['rss_mib']:.0f} MiB, "
                          f"PSS {r['pss_mib']:.0f} MiB)", flush=True)
                else:
                    f = await boot_floor(config, floor_dir)
                    floor.append(f)
                    print(f"run {i + 1} floor: marker {f['marker_s']:.2f} s (guest /init {f['init_uptime_s']}; "
                          f"QEMU CPU {f['qemu_cpu_s']:.2f} s)", flush=True)
    result = report(real, floor, (load0, os.getloadavg()[0]), args)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    asyncio.run(main())
