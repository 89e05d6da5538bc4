"""`capsem pool start|stop|status`."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys

from ..config import DEFAULT_CPUS, DEFAULT_MEMORY_MB
from ..errors import VMError
from ..polling import PollTimeout, poll_until


def add_parser(sub) -> None:
    p = sub.add_parser("pool", help="a pool of warm VMs for fast kernel starts")
    psub = p.add_subparsers(dest="pool_command", metavar="ACTION")
    start = psub.add_parser("start", help="start this user's pool service")
    start.add_argument("--size", type=int, default=2, help="warm VMs to keep (default 2)")
    start.add_argument("--memory", type=int, default=DEFAULT_MEMORY_MB, help="guest memory in MB")
    start.add_argument("--cpus", type=int, default=DEFAULT_CPUS, help="virtual CPUs per VM")
    start.add_argument("--flavour", action="append", default=[], metavar="MB,CPUS,N[,IMAGE]",
                       help="also keep N warm VMs of this memory, CPU count and image (name or dir; "
                            "default: --image) (repeatable; for kernelspecs with other memory_mb/cpus/image; "
                            "a kernel claims only a VM of its own)")
    start.add_argument("--image", default=None,
                       help="image name or dir of the --size VMs and of flavours without one (default: the default image)")
    start.add_argument("--accel", choices=("auto", "kvm", "tcg"), default="auto")
    start.add_argument("--budget", type=int, default=0,
                       help="memory budget in MB for pooled VMs (default: what all flavours' VMs need)")
    start.add_argument("--parallel", type=int, default=2, help="VMs booting at once (default 2)")
    start.add_argument("--boot-timeout", type=float, default=300.0)
    start.add_argument("--foreground", action="store_true", help="run in this process (logs to stderr)")
    start.add_argument("--wait", action="store_true", help="return once the pool is full")
    start.set_defaults(func=cmd_start)
    stop = psub.add_parser("stop", help="stop the pool service (its unclaimed VMs go with it)")
    stop.set_defaults(func=cmd_stop)
    status = psub.add_parser("status", help="the pool's VMs, their age and memory")
    status.add_argument("--json", action="store_true")
    status.set_defaults(func=cmd_status)
    p.set_defaults(func=lambda args: p.print_help() or 2)


def _config(args):
    from .service import PoolConfig
    from .wire import Shape, WireError
    if args.size < 0 or args.parallel < 1:
        raise VMError("--size must be >= 0 and --parallel >= 1")
    try:
        Shape.checked(args.memory, args.cpus, args.size)
        more = tuple(Shape.parse(text) for text in args.flavour)
    except WireError as exc:
        raise VMError(str(exc), "see capsem pool start --help") from None
    from ..image.store import resolve_image
    for image in {args.image, *(s.image for s in more)}:
        resolve_image(image)  # a missing image: said now, not by every boot in the pool's log
    return PoolConfig(size=args.size, memory_mb=args.memory, cpus=args.cpus, image=args.image,
                      accel=args.accel, budget_mb=args.budget, parallel=args.parallel,
                      boot_timeout=args.boot_timeout, more=more)


def cmd_start(args) -> int:
    from . import client
    from .service import pool_dir, run_foreground
    config = _config(args)
    try:
        st = asyncio.run(client.status())
        raise VMError(f"a capsem pool already runs for this user (pid {st.get('pid')})",
                      "capsem pool status / capsem pool stop")
    except client.PoolUnavailable:
        pass
    if args.foreground:
        return run_foreground(config)
    argv = [sys.executable, "-m", "capsem_vm.cli", "pool", "start", "--foreground",
            "--size", str(config.size), "--memory", str(config.memory_mb), "--cpus", str(config.cpus),
            "--accel", config.accel, "--budget", str(config.budget_mb), "--parallel", str(config.parallel),
            "--boot-timeout", str(config.boot_timeout)] + (["--image", config.image] if config.image else [])
    for shape in config.more:
        argv += ["--flavour", f"{shape.memory_mb},{shape.cpus},{shape.size}" + (f",{shape.image}" if shape.image else "")]
    log_path = pool_dir() / "pool.log"
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW, 0o600)
    try:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=fd, stderr=fd, start_new_session=True,
                                close_fds=True)
    finally:
        os.close(fd)

    def answering() -> bool:
        if proc.poll() is not None:
            raise VMError(f"the pool service exited with code {proc.returncode}", f"see {log_path}")
        try:
            return asyncio.run(client.status()).get("pid") == proc.pid
        except client.PoolUnavailable:
            return False
    poll_until(answering, what="the pool service to answer", timeout=30, interval=0.2,
               error=lambda message: VMError(message, f"see {log_path}"))
    kept = ", ".join(s.label() for s in config.shapes)
    print(f"capsem pool started (pid {proc.pid}, {kept}; log {log_path})")
    if args.wait:
        wait_full(sum(s.size for s in config.shapes), timeout=config.boot_timeout + 600)
    return 0


def wait_full(size: int, timeout: float) -> dict:
    from . import client

    def full() -> dict | None:
        st = asyncio.run(client.status())
        return st if sum(v["state"] == "ready" for v in st["vms"]) >= size else None
    return poll_until(full, what=f"the pool to fill up ({size} ready VMs)", timeout=timeout, interval=0.5,
                      error=VMError)


def cmd_stop(args) -> int:
    from . import client
    st = asyncio.run(client.status())
    asyncio.run(client.stop())

    def gone() -> bool:  # exited (no /proc entry, or a zombie its parent has not reaped)
        try:
            with open(f"/proc/{st['pid']}/stat") as f:
                return f.read().rsplit(")", 1)[1].split()[0] == "Z"
        except OSError:
            return True
    with contextlib.suppress(PollTimeout):  # still there after a minute: report it stopping anyway
        poll_until(gone, what="the pool service to exit", timeout=60, interval=0.2)
    print("capsem pool stopped")
    return 0


def cmd_status(args) -> int:
    from . import client
    st = asyncio.run(client.status())
    if args.json:
        print(json.dumps(st, indent=2))
        return 0
    from .wire import Shape
    kept = ", ".join(Shape(f["memory_mb"], f["cpus"], f["size"], f.get("image")).label() for f in st["flavours"])
    print(f"pool pid {st['pid']}: {kept}, "
          f"budget {st['budget_mb']} MB, {st['claims']} claimed so far ({st['claimed_alive']} still running), "
          f"up {st['uptime_s']:.0f} s")
    if st.get("boots_paused_s"):
        print(f"  boots paused for {st['boots_paused_s']:.1f} s more: a kernel claimed a VM just now")
    for v in st["vms"]:
        rss = f"{v['rss_mb']:.0f} MB resident" if v.get("rss_mb") else "-"
        state = "paused" if v.get("paused") else v["state"]
        image = f"  image {v['image']}" if v.get("image") else ""
        print(f"  {v['id']:<16} {state:<8} age {v['age_s']:>7.1f} s  {v['memory_mb']} MB/{v['cpus']} CPUs  {rss}{image}")
    return 0
