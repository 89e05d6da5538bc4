"""`capsem vm run` and `capsem vm shell`: run a command (or a shell) in a fresh VM."""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
import termios
import tty
from pathlib import Path

from . import accel
from .config import DEFAULT_CPUS, DEFAULT_MEMORY_MB, EgressConfig, Share, VMConfig
from .errors import VMError
from .vm import VM

STDIN_CHUNK = 65536


def add_parser(sub) -> None:
    vm = sub.add_parser("vm", help="run commands in a fresh VM", description="Run commands in a fresh VM.")
    vm_sub = vm.add_subparsers(dest="vm_command", metavar="COMMAND")

    run = vm_sub.add_parser(
        "run", help="boot a VM, run a command in it, tear it down",
        description="Boot a VM, run CMD in it (cwd = the shared folder, at the same path), stream its "
                    "output, exit with its exit code and tear everything down.",
        epilog="example: capsem vm run --share . -- python3 -c 'import os; print(os.listdir())'")
    _vm_options(run)
    run.add_argument("argv", nargs=argparse.REMAINDER, metavar="-- CMD [ARGS...]", help="the command to run in the guest")
    run.set_defaults(func=cmd_run)

    shell = vm_sub.add_parser("shell", help="an interactive shell in a fresh VM",
                              description="Boot a VM and open an interactive shell in it.")
    _vm_options(shell)
    shell.set_defaults(func=cmd_shell, argv=[])
    vm.set_defaults(func=lambda args: vm.print_help() or 2)


def _vm_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--share", metavar="DIR", help="share DIR with the guest (VirtioFS) at the same absolute path; it becomes the cwd")
    p.add_argument("--read-only", action="store_true", help="share DIR read-only")
    p.add_argument("--memory", type=int, default=DEFAULT_MEMORY_MB, metavar="MB", help=f"guest memory (default {DEFAULT_MEMORY_MB})")
    p.add_argument("--cpus", type=int, default=DEFAULT_CPUS, metavar="N", help=f"virtual CPUs (default {DEFAULT_CPUS})")
    p.add_argument("--accel", choices=accel.CHOICES, default="auto", help="accelerator (default auto: KVM if usable, else TCG)")
    p.add_argument("--vsock", choices=("auto", "vhost-user", "kernel"), default="auto", help="vsock backend")
    p.add_argument("--image", metavar="DIR", help="image directory (default: the built default image)")
    p.add_argument("--policy", metavar="FILE",
                   help="egress policy (TOML); default: policy.toml in the user's config dir, else deny all")
    p.add_argument("--no-egress", action="store_true",
                   help="no way out at all: no resolver, proxy or capture in the guest")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress messages")


def _config(args) -> VMConfig:
    shares = ()
    if args.share:
        host = Path(args.share).resolve()
        if not host.is_dir():
            raise SystemExit(f"capsem: error: --share {args.share}: not a directory")
        shares = (Share(host, "share0", readonly=args.read_only),)
    if args.policy and args.no_egress:
        raise SystemExit("capsem: error: --policy and --no-egress exclude each other")
    egress = None if args.no_egress else EgressConfig(
        policy=str(Path(args.policy).resolve()) if args.policy else None)
    try:
        return VMConfig(memory_mb=args.memory, cpus=args.cpus, accel=args.accel, image=args.image, shares=shares,
                        egress=egress)
    except ValueError as exc:
        raise SystemExit(f"capsem: error: {exc}") from None


def _progress(args):
    if args.quiet:
        return None
    return lambda msg: print(f"capsem: {msg}", file=sys.stderr, flush=True)


def cmd_run(args) -> int:
    argv = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
    if not argv:
        print("capsem: error: no command given (usage: capsem vm run [OPTIONS] -- CMD [ARGS...])", file=sys.stderr)
        return 2
    config = _config(args)
    return asyncio.run(_run(config, argv, args, pty=False))


def cmd_shell(args) -> int:
    config = _config(args)
    interactive = sys.stdin.isatty() and sys.stdout.isatty()
    argv = ["/bin/bash", "-l"] if interactive else ["/bin/sh"]
    return asyncio.run(_run(config, argv, args, pty=interactive))


async def _run(config: VMConfig, argv: list[str], args, pty: bool) -> int:
    loop = asyncio.get_running_loop()
    egress_runtime = None
    if config.egress is not None:
        from .egress_runtime import EgressRuntime  # why lazy: proxy code only for VMs with egress
        egress_runtime = EgressRuntime()
    vm = VM(config, vsock=args.vsock, progress=_progress(args), egress_runtime=egress_runtime)
    try:
        return await _run_in(vm, config, argv, args, pty, loop)
    finally:
        if egress_runtime is not None:
            await egress_runtime.close()  # a one-shot command keeps no proxy around


async def _run_in(vm: VM, config: VMConfig, argv: list[str], args, pty: bool, loop) -> int:
    async with vm:
        if vm.egress is not None and not args.quiet:
            print(f"capsem: egress policy {vm.egress.policy.source}; audit: capsem audit --kernel "
                  f"{vm.egress.kernel_id}", file=sys.stderr, flush=True)
        cwd = config.shares[0].guest_path if config.shares else "/root"
        rows, cols = _terminal_size() if pty else (None, None)
        env = {"TERM": os.environ.get("TERM", "xterm")} if pty else None
        proc = await vm.control.exec(argv, cwd=cwd, stdin=True, pty=pty, rows=rows, cols=cols, env=env)
        interrupts = 0
        signals: set[asyncio.Task] = set()  # strong references: asyncio holds tasks weakly

        def on_sigint():
            nonlocal interrupts
            interrupts += 1
            if interrupts > 2:  # the guest ignores us: give up on it
                pump.cancel()
                return
            signals.add(loop.create_task(proc.signal(signal.SIGINT)))

        loop.add_signal_handler(signal.SIGINT, on_sigint)
        if pty:
            loop.add_signal_handler(signal.SIGWINCH, lambda: signals.add(loop.create_task(proc.resize(*_terminal_size()))))
        stdin_task = loop.create_task(_forward_stdin(proc))
        pump = loop.create_task(_pump_output(proc))
        saved = _raw_mode() if pty else None
        try:
            await pump
        except asyncio.CancelledError:
            print("\ncapsem: guest did not stop after repeated interrupts; tearing the VM down", file=sys.stderr)
            return 130
        except VMError as exc:  # the VM went away mid-command: say which helper took it down, if one did
            reason = await _death_reason(vm)
            if reason is not None:
                raise VMError(f"the VM died: {reason}") from exc
            raise
        finally:
            if saved is not None:
                termios.tcsetattr(sys.stdin.fileno(), termios.TCSADRAIN, saved)
            stdin_task.cancel()
            loop.remove_signal_handler(signal.SIGINT)
        return proc.result.shell_code


async def _death_reason(vm: VM, wait: float = 1.0) -> str | None:
    """Why the VM died, if a helper's exit did it. A dead vsock backend closes the agent's connection
    at about the moment its pidfd fires: give the watch that moment."""
    deadline = asyncio.get_running_loop().time() + wait
    while vm.death_reason is None and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.02)
    return vm.death_reason


async def _pump_output(proc) -> None:
    out, err = sys.stdout.buffer, sys.stderr.buffer
    async for fd, data in proc.output():
        stream = err if fd == 2 else out
        stream.write(data)
        stream.flush()


async def _forward_stdin(proc) -> None:
    try:
        fd = sys.stdin.fileno()
    except (AttributeError, ValueError, OSError):
        fd = -1
    try:
        if fd >= 0:
            async for data in _read_chunks(fd):
                await proc.write_stdin(data)
    except OSError:
        pass  # stdin went away: treat as end of input
    finally:
        try:
            await proc.close_stdin()
        except Exception:
            pass


async def _read_chunks(fd: int):
    """Yield chunks of `fd` until EOF without blocking the loop or changing the fd's flags."""
    loop = asyncio.get_running_loop()
    ready = asyncio.Event()

    def on_readable():
        loop.remove_reader(fd)  # one-shot: re-armed only when the consumer wants more
        ready.set()

    try:
        loop.add_reader(fd, on_readable)
    except PermissionError:  # regular file or /dev/null: reads never block, use a thread
        while data := await loop.run_in_executor(None, os.read, fd, STDIN_CHUNK):
            yield data
        return
    try:
        while True:
            await ready.wait()
            ready.clear()
            data = os.read(fd, STDIN_CHUNK)
            if not data:
                return
            yield data
            loop.add_reader(fd, on_readable)
    finally:
        loop.remove_reader(fd)


def _terminal_size() -> tuple[int, int]:
    size = os.get_terminal_size(sys.stdout.fileno())
    return size.lines, size.columns


def _raw_mode():
    fd = sys.stdin.fileno()
    saved = termios.tcgetattr(fd)
    tty.setraw(fd)
    return saved
