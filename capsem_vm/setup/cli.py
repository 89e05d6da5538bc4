"""`capsem setup` and `capsem uninstall`.

Exit codes of setup: 0 everything is there; 1 a step failed or cannot be done on this host;
3 the rest needs root (the exact commands are printed).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from . import plan as P

LABELS = {P.DO: "to do", P.DONE: "already there", P.ROOT: "needs root", P.BLOCKED: "cannot", P.OFF: "skipped"}


def add_parser(sub) -> None:
    p = sub.add_parser("setup", help="install what capsem needs (host packages, proxy env, VM image); idempotent",
                       description="Install what capsem needs: as root the host packages, the egress proxy's "
                                   "env in /opt/capsem and the system VM image; as a normal user what can be "
                                   "done without root, and the exact commands root must run for the rest. "
                                   "A second run changes nothing. Retires images of an older builder version; "
                                   "keeps the CA and audit data.")
    p.add_argument("--dry-run", action="store_true", help="print the plan, change nothing")
    p.add_argument("--no-packages", action="store_true", help="leave the host packages alone")
    p.add_argument("--no-proxy-env", action="store_true", help="leave the proxy env alone")
    img = p.add_mutually_exclusive_group()
    img.add_argument("--no-image", dest="image", action="store_false", default=None, help="do not build the VM image")
    img.add_argument("--image", dest="image", action="store_true",
                     help="as a normal user: build your own image (root builds the system image anyway)")
    p.add_argument("--dev", action="store_true",
                   help="also what working on capsem needs (make, nodejs, npm, chromium): `make system`")
    p.add_argument("--proxy-env", metavar="DIR", help="make the proxy env here (default: /opt/capsem/proxy-venv "
                   "as root, else the system one if there, else your data dir's proxy-venv)")
    p.add_argument("--os-release", metavar="FILE", help="plan for the host this os-release file describes "
                   "(with --dry-run: what setup would do on another release)")
    p.set_defaults(func=cmd_setup)

    u = sub.add_parser("uninstall", help="remove capsem's kernelspecs, images, runtime state and proxy env",
                       description="Remove what capsem put on this host for you (as root: also for everyone): "
                                   "kernelspecs, images, runtime state, proxy envs. The CA, signing keys, audit "
                                   "database and policies only with --data, after a confirmation (or --yes). "
                                   "Host packages, your notebooks and anything outside capsem's own "
                                   "directories stay. Stop kernels and `capsem pool` first: their runtime "
                                   "state goes too.")
    u.add_argument("--dry-run", action="store_true", help="list what would be removed, remove nothing")
    u.add_argument("--data", action="store_true", help="also the CA, signing keys, audit database and policies")
    u.add_argument("--yes", action="store_true", help="do not ask before removing --data")
    u.set_defaults(func=cmd_uninstall)


def _options(args) -> P.Options:
    return P.Options(packages=not args.no_packages, proxy_env=not args.no_proxy_env, image=args.image,
                     dev=args.dev, proxy_env_path=args.proxy_env)


def _say(msg: str) -> None:
    print(msg, flush=True)


def print_plan(steps: list[P.Step], who: str) -> None:
    _say(f"capsem setup: plan ({who})")
    for i, s in enumerate(steps, 1):
        _say(f"  [{i}/{len(steps)}] {s.title}: {LABELS[s.state]}: {s.detail}")
        if s.state in (P.DO, P.ROOT):
            for c in s.commands:
                _say(f"        {'as root: ' if s.state == P.ROOT else ''}{c}")


def cmd_setup(args) -> int:
    from .facts import gather
    from .steps import SetupError, run_step
    options = _options(args)
    facts = gather(options, args.os_release)
    steps = P.plan_setup(facts, options)
    who = "as root" if facts.is_root else f"as {_user()} (not root)"
    if args.dry_run:
        print_plan(steps, who)
        return 0
    start = time.monotonic()
    done, failed = [], []
    for i, s in enumerate(steps, 1):
        head = f"[{i}/{len(steps)}] {s.title}"
        if s.state != P.DO:
            _say(f"{head}: {LABELS[s.state]}: {s.detail}")
            continue
        _say(f"{head}: {s.detail} ...")
        t0 = time.monotonic()
        try:
            run_step(s)
        except (SetupError, OSError) as exc:
            failed.append(f"{s.title}: {exc}")
            _say(f"{head}: FAILED after {time.monotonic() - t0:.0f}s: {exc}")
            if s.key == "packages":
                break  # what follows needs them
            continue
        done.append(f"{s.title} ({time.monotonic() - t0:.0f}s)")
        _say(f"{head}: done in {time.monotonic() - t0:.0f}s")
    return summary(steps, done, failed, time.monotonic() - start)


def summary(steps: list[P.Step], done: list[str], failed: list[str], elapsed: float) -> int:
    there = [s.title for s in steps if s.state == P.DONE]
    _say(f"capsem setup: summary ({elapsed:.0f}s)")
    _say(f"  done: {', '.join(done) if done else 'nothing (all was already there)' if not failed else 'nothing'}")
    if there:
        _say(f"  already there: {', '.join(there)}")
    for s in steps:
        if s.state == P.OFF:
            _say(f"  skipped: {s.title} ({s.detail})")
    blocked = [s for s in steps if s.state == P.BLOCKED]
    for s in blocked:
        _say(f"  cannot: {s.title}: {s.detail}")
    for f in failed:
        _say(f"  FAILED: {f}")
    root = P.root_commands(steps)
    if root:
        _say("  root must run (then run `capsem setup` again as yourself):")
        for c in root:
            _say(f"    {c}")
    if failed or blocked:
        return 1
    return 3 if root else 0


def _user() -> str:
    import pwd
    try:
        return pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        return f"uid {os.geteuid()}"


def cmd_uninstall(args) -> int:
    from . import removal
    targets, notes = removal.plan(args.data)
    for n in notes:
        _say(f"capsem uninstall: {n}")
    if not targets:
        _say("capsem uninstall: nothing of capsem's is here")
        return 0
    verb = "would remove" if args.dry_run else "removing"
    for t in targets:
        _say(f"capsem uninstall: {verb} {t.what}: {t.path}")
    if args.dry_run:
        return 0
    if args.data and not args.yes and any(t.kind == removal.DATA for t in targets):
        if not sys.stdin.isatty():
            print("capsem uninstall: error: --data removes the CA, keys, audit database and policies: "
                  "confirm with --yes (no terminal to ask on)", file=sys.stderr)
            return 1
        answer = input("This deletes the CA, signing keys, audit database and policies. Type 'delete' to go on: ")
        if answer.strip() != "delete":
            _say("capsem uninstall: nothing removed")
            return 1
    for t in targets:
        removal.remove(t)
    _say(f"capsem uninstall: removed {len(targets)} item(s); host packages stay "
         "(remove them with apt-get if nothing else needs them)")
    return 0
