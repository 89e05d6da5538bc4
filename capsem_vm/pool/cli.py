"""`capsem pool start|stop|status`."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys

from ..errors import VMError
from ..polling import PollTimeout, poll_until
from .config import PoolConfig, add_start_options


def add_parser(sub) -> None:
    p = sub.add_parser("pool", help="a pool of warm VMs for fast kernel starts")
    psub = p.add_subparsers(dest="pool_command", metavar="ACTION")
    start = psub.add_parser("start", help="start this user's pool service")
    add_start_options(start)
    start.add_argument("--foreground", action="store_true", help="run in this process (logs to stderr)")
    start.add_argument("--wait", action="store_true", help="return once the pool is full")
    start.set_defaults(func=cmd_start)
    stop = psub.add_parser("stop", help="stop the pool service (its unclaimed VMs go with it)")
    stop.set_defaults(func=cmd_stop)
    status = psub.add_parser("status", help="the pool's VMs, their age and memory")
    status.add_argument("--json", action="store_true")
    status.set_defaults(func=cmd_status)
    p.set_defaults(func=lambda args: p.print_help() or 2)


def _config(args) -> PoolConfig:
    config = PoolConfig.from_args(args)
    from ..image.store import resolve_image
    for image in {config.image, *(s.image for s in config.more)}:
        resolve_image(image)  # a missing image: said now, not by every boot in the pool's log
    return config


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
    argv = [sys.executable, "-m", "capsem_vm.cli", "pool", "start", "--foreground", *config.to_argv()]
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
