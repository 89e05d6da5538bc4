"""`capsem kernel install`: make the capsem kernel available to Jupyter front ends; `capsem mcp`:
serve a sandbox to MCP clients (capsem_kernel/mcp_server.py)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from capsem_vm.config import DEFAULT_CPUS, DEFAULT_MEMORY_MB

from . import kernelspec


def add_parser(sub) -> None:
    kernel = sub.add_parser("kernel", help="manage the capsem Jupyter kernelspec",
                            description="Manage the capsem Jupyter kernelspec.")
    ksub = kernel.add_subparsers(dest="kernel_command", metavar="COMMAND")
    p = ksub.add_parser("install", help="install the capsem kernelspec",
                        description="Install a kernelspec whose kernels each run in their own VM.",
                        epilog="Then: jupyter console --kernel capsem, or pick it in JupyterLab.")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--user", action="store_true", help="install for the current user only")
    where.add_argument("--sys-prefix", action="store_true", help="install into this Python env (sys.prefix)")
    where.add_argument("--prefix", metavar="P", help="install under prefix P")
    p.add_argument("--name", default=kernelspec.DEFAULT_NAME, help="kernel name (default: capsem)")
    p.add_argument("--display-name", default=kernelspec.DEFAULT_DISPLAY_NAME, help="name shown in front ends")
    # Only the options given are written into the kernelspec: the rest stay unset there, so Jupyter
    # config (c.CapsemProvisioner.memory_mb = ...) still applies to them.
    p.add_argument("--memory", type=int, metavar="MB", help=f"guest memory per kernel (default {DEFAULT_MEMORY_MB})")
    p.add_argument("--cpus", type=int, metavar="N", help=f"virtual CPUs per kernel (default {DEFAULT_CPUS})")
    p.add_argument("--share-mode", choices=("rw", "ro"), help="notebook folder shared read-write (default) or read-only")
    p.add_argument("--policy", metavar="FILE", help="egress policy file (host-side; absolute path stored)")
    p.add_argument("--observe", action="store_true",
                   help="OBSERVE MODE, for trusted code only: what the policy would refuse goes out and is audited "
                        "as would-deny, to learn a workload's needs (then `capsem policy suggest`)")
    p.add_argument("--accel", choices=("auto", "kvm", "tcg"), help="accelerator (default auto)")
    p.add_argument("--image", metavar="DIR", help="VM image directory (default: the built default image)")
    p.add_argument("--pool", action="store_true", help="claim warm VMs from `capsem pool` (use_pool)")
    p.add_argument("--pool-autostart", action="store_true",
                   help="with --pool: start the pool service on demand (pool_autostart)")
    p.add_argument("--ray", metavar="ADDRESS",
                   help="place each kernel on a node of the Ray cluster at ADDRESS (one with the 'capsem' "
                        "resource); needs capsem-jupyter[ray]")
    p.set_defaults(func=cmd_install)
    kernel.set_defaults(func=lambda args: kernel.print_help() or 2)
    add_mcp_parser(sub)


def cmd_install(args) -> int:
    if (args.memory is not None and args.memory < 256) or (args.cpus is not None and not 1 <= args.cpus <= 64):
        print("capsem: error: --memory must be >= 256 and --cpus between 1 and 64")
        return 2
    given = {"memory_mb": args.memory, "cpus": args.cpus, "share_mode": args.share_mode, "accel": args.accel}
    config = {key: value for key, value in given.items() if value is not None}
    if args.policy:
        policy = Path(args.policy).resolve()
        if not policy.is_file():
            print(f"capsem: error: --policy {args.policy}: no such file")
            return 2
        config["policy"] = str(policy)
    if args.observe:
        config["observe_mode"] = True
    if args.image:
        config["image"] = str(Path(args.image).resolve())
    if args.pool or args.pool_autostart:
        config["use_pool"] = True
    if args.pool_autostart:
        config["pool_autostart"] = True
    name = kernelspec.PROVISIONER_NAME
    if args.ray:
        config["ray_address"] = args.ray
        name = kernelspec.RAY_PROVISIONER_NAME
    prefix = kernelspec.sys_prefix() if args.sys_prefix else args.prefix
    path = kernelspec.install(args.name, args.display_name, user=args.user, prefix=prefix, provisioner_config=config,
                              provisioner_name=name)
    print(f"installed kernelspec {args.name!r} in {path}")
    return 0


MCP_EPILOG = """\
Register it with an MCP client (Claude Desktop's claude_desktop_config.json, VS Code's mcp.json):
  {"mcpServers": {"capsem": {"command": "capsem", "args": ["mcp", "--policy", "/abs/policy.toml"]}}}
The sandbox (one VM) starts on the first tool call and stops when the client disconnects."""


def add_mcp_parser(sub) -> None:
    from .mcp_server import IDLE_TIMEOUT
    p = sub.add_parser("mcp", help="serve a capsem sandbox to MCP clients (agents) over stdio",
                       description="An MCP server (stdio) whose tools (run_code, run_command, restart,\n"
                                   "network_log) run in one capsem sandbox: a Jupyter kernel in its own VM,\n"
                                   "egress only through the policy proxy, every request audited.",
                       epilog=MCP_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--policy", metavar="FILE",
                   help="egress policy file (default: the user's config dir policy, else deny-all)")
    p.add_argument("--folder", metavar="DIR",
                   help="shared working folder (default: a fresh temporary folder, removed at the end)")
    p.add_argument("--keep-folder", action="store_true", help="keep the temporary folder at the end")
    p.add_argument("--memory", type=int, metavar="MB", help=f"guest memory (default {DEFAULT_MEMORY_MB})")
    p.add_argument("--cpus", type=int, metavar="N", help=f"virtual CPUs (default {DEFAULT_CPUS})")
    p.add_argument("--image", metavar="DIR", help="VM image directory (default: the built default image)")
    p.add_argument("--no-pool", action="store_true", help="always cold-boot (never claim a warm VM from `capsem pool`)")
    p.add_argument("--timeout", type=float, metavar="S", help="default timeout of run_code / run_command (default: none)")
    p.add_argument("--idle-timeout", type=float, metavar="S", default=IDLE_TIMEOUT,
                   help=f"close the sandbox after S seconds without a tool call; 0: never (default {IDLE_TIMEOUT:g})")
    p.add_argument("--http", action="store_true",
                   help="serve streamable HTTP (one sandbox per MCP session, bearer token) instead of stdio")
    p.add_argument("--host", default="127.0.0.1", help="--http: address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8765, help="--http: port (default 8765)")
    p.add_argument("--token-file", metavar="FILE",
                   help="--http: the bearer token, from a 0600 file of yours (default: a fresh one, printed once)")
    p.add_argument("--max-sessions", type=int, default=4, metavar="N", help="--http: sessions (VMs) at once (default 4)")
    p.set_defaults(func=cmd_mcp)


def cmd_mcp(args) -> int:
    if (args.memory is not None and args.memory < 256) or (args.cpus is not None and not 1 <= args.cpus <= 64):
        print("capsem: error: --memory must be >= 256 and --cpus between 1 and 64", file=sys.stderr)
        return 2
    for flag, path, check in (("--policy", args.policy, Path.is_file), ("--folder", args.folder, Path.is_dir),
                              ("--image", args.image, Path.is_dir)):
        if path and not check(Path(path).expanduser()):
            print(f"capsem: error: {flag} {path}: not found", file=sys.stderr)
            return 2
    try:
        from .mcp_server import Options, serve_stdio
        import mcp  # noqa: F401 - the optional dependency: a clear message when it is missing
    except ImportError:
        print("capsem: error: `capsem mcp` needs the MCP SDK: pip install 'capsem-jupyter[mcp]'", file=sys.stderr)
        return 2
    options = Options(folder=args.folder, policy=args.policy, memory_mb=args.memory, cpus=args.cpus,
                      image=args.image and str(Path(args.image).expanduser().resolve()),
                      use_pool=not args.no_pool, timeout=args.timeout, idle_timeout=args.idle_timeout,
                      keep_folder=args.keep_folder)
    if args.http:
        from .mcp_http import serve_http
        return serve_http(options, host=args.host, port=args.port, token_file=args.token_file,
                          max_sessions=max(1, args.max_sessions))
    return serve_stdio(options)
