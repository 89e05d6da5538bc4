"""`capsem policy check METHOD URL [--policy FILE] [--json]`: what the policy decides and why.

Exit status: 0 allowed, 1 denied, 2 the policy (or the URL) is invalid.
"""

from __future__ import annotations

import argparse
import json
import sys
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
    return p


def main(argv: list[str] | None = None) -> int:
    from ..cli import group_main
    return group_main(add_parser, argv)


if __name__ == "__main__":
    sys.exit(main())
