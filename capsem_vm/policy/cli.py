"""`capsem policy check METHOD URL [--policy FILE] [--json]`: what the policy decides and why.

Exit status: 0 allowed, 1 denied, 2 the policy (or the URL) is invalid.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from urllib.parse import urlsplit

from . import loader
from .loader import PolicyError, load_policy
from .paths import canonicalize
from .source import resolve_policy_path, user_policy_path


def _check(args) -> int:
    try:
        path = resolve_policy_path(args.policy)
        policy = load_policy(path) if path else loader.default_policy()
    except PolicyError as exc:
        print(f"capsem policy: {exc}", file=sys.stderr)
        return 2
    d = policy.decide(args.method, args.url)
    try:
        parts = urlsplit(args.url)
        host, port = parts.hostname or "", parts.port
    except ValueError:
        parts, host, port = None, "", None
    canonical = canonicalize(parts.path or "/") if parts is not None and parts.scheme != "tcp" else None
    dns = policy.decide_connect(host) if host else None
    conn = policy.decide_connect(host, port or {"http": 80, "ws": 80}.get(parts.scheme, 443)) if host else None
    if args.json:
        out = {"policy": str(path) if path else None, "method": args.method.upper(), "url": args.url,
               "action": d.action, "rule": d.rule, "reason": d.reason, "origin": d.origin,
               "dns": dns.action if dns else None, "connect": conn.action if conn else None,
               "path": canonical.path if canonical else None,
               "ambiguous": canonical.ambiguous if canonical else None}
        print(json.dumps(out))
    else:
        print(f"{d.action.upper()}  {args.method.upper()} {args.url}")
        print(f"  rule:    {d.rule}" + (f"  ({d.origin})" if d.origin else ""))
        print(f"  reason:  {d.reason}")
        if canonical is not None:
            print(f"  path:    {canonical.path} (canonical: what rules match, and what an allowed request sends upstream)"
                  + (f"; ambiguous: {canonical.ambiguous}" if canonical.ambiguous else ""))
        if dns is not None:
            print(f"  dns:     {'answered (synthetic address)' if dns.allowed else 'NXDOMAIN'}  [{dns.rule}]")
            print(f"  connect: {conn.action}  [{conn.rule}]")
        print(f"  policy:  {path if path else f'built-in deny-all (no {user_policy_path()})'}")
    return 0 if d.allowed else 1


def _suggest(args) -> int:
    from ..proxy.audit import default_db_path
    from . import suggest, suggest_io
    from .addresses import own_addresses
    if args.apply and args.policy and Path(args.apply).expanduser() != Path(args.policy).expanduser():
        print("capsem policy suggest: --apply FILE is the policy judged against; leave out --policy", file=sys.stderr)
        return 2
    try:
        since = suggest_io.parse_since(args.since) if args.since else None
    except ValueError:
        print(f"capsem policy suggest: --since {args.since!r}: use 30m, 2h, 1d, an ISO time or epoch seconds",
              file=sys.stderr)
        return 2
    try:
        path = Path(args.apply).expanduser() if args.apply else resolve_policy_path(args.policy)
        base = path.read_text(encoding="utf-8") if path and path.exists() else ""
        policy = loader.parse_policy(base, str(path)) if path else loader.default_policy()
        db = Path(args.db) if args.db else default_db_path()
        rows = suggest_io.read_refusals(db, kernel=args.kernel, since=since)
        report = suggest.suggest(rows, policy, own=own_addresses(), base_text=base)
    except (PolicyError, suggest_io.SuggestError, OSError, UnicodeDecodeError) as exc:
        print(f"capsem policy suggest: {exc}", file=sys.stderr)
        return 2
    print(suggest.render(report, source=str(db)), end="")
    if not args.apply or not report.rules():
        return 0

    def confirm(diff_text: str) -> bool:
        print(f"\n# --- the change to {path} ---\n{diff_text}", end="", file=sys.stderr)  # stdout stays TOML
        if args.yes:
            return True
        if not sys.stdin.isatty():
            print("capsem policy suggest: not applied (no terminal to ask on: pass --yes)", file=sys.stderr)
            return False
        print(f"Append {len(report.rules())} rule(s) to {path}? [y/N] ", end="", file=sys.stderr, flush=True)
        return sys.stdin.readline().strip().lower() in ("y", "yes")
    try:
        done = suggest_io.apply(path, suggest.render(report, source=str(db), for_apply=True), report.rules(), confirm)
    except suggest_io.SuggestError as exc:
        print(f"capsem policy suggest: {exc}", file=sys.stderr)
        return 2
    print(f"capsem policy suggest: {'appended to' if done else 'not applied, unchanged:'} {path}", file=sys.stderr)
    return 0 if done else 1


SUGGEST_HELP = """Print the smallest allow rules (TOML) that would have let refused requests through,
read from the audit log: one exact host per rule, methods and paths only where the requests were
seen (refusals at DNS or connect time give host, scheme and port only), with comments saying which
requests each rule lets through and how often. Refusals by built-in protections (DNS-over-HTTPS,
protected addresses, Host/SNI mismatch, ambiguous paths, ...) and by your own deny rules are
listed, never suggested. Requests the policy already allows are skipped.

Examples:
  capsem policy suggest --since 1h                 # what was refused in the last hour
  capsem policy suggest --kernel 3f2a... --apply ~/.config/capsem/policy.toml
  capsem policy suggest --apply policy.toml --yes  # append without asking (scripts)

--apply FILE shows the change as a diff and asks before appending to FILE (created if missing);
it only appends [[rule]] tables, never touches credentials, and leaves the file as it was on any
error. Exit status: 0 printed (or applied), 1 not applied, 2 error.
"""


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("policy", help="inspect egress policies",
                              description=loader.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="policy_cmd", required=True)
    c = sub.add_parser("check", help="show what a policy decides for one request, and why",
                       description=__doc__ + "\n" + loader.__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    c.add_argument("method", metavar="METHOD", help="HTTP method, e.g. GET (ignored for tcp:// URLs)")
    c.add_argument("url", metavar="URL", help="absolute URL: http(s)://, ws(s):// or tcp://host:port")
    c.add_argument("--policy", metavar="FILE", help=f"policy file (default: {user_policy_path()})")
    c.add_argument("--json", action="store_true", help="print one JSON object")
    c.set_defaults(func=_check)
    g = sub.add_parser("suggest", help="suggest allow rules from refused requests in the audit log",
                       description=SUGGEST_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    g.add_argument("--kernel", metavar="ID", help="only this kernel's refusals")
    g.add_argument("--since", metavar="TIME", help="only refusals since TIME: 30m, 2h, 1d, an ISO time, epoch seconds")
    g.add_argument("--policy", metavar="FILE", help=f"the policy to judge against (default: {user_policy_path()})")
    g.add_argument("--apply", metavar="FILE", help="append the suggested rules to FILE after showing the diff and asking")
    g.add_argument("--yes", action="store_true", help="with --apply: do not ask")
    g.add_argument("--db", metavar="FILE", help="audit database (default: the user data dir's audit.sqlite3)")
    g.set_defaults(func=_suggest)
    return p


def main(argv: list[str] | None = None) -> int:
    from ..cli import group_main
    return group_main(add_parser, argv)


if __name__ == "__main__":
    sys.exit(main())
