"""`capsem audit [--kernel ID] [--follow] [--json]` and `capsem proxy ca` (print the CA certificate)."""

from __future__ import annotations

import datetime
import json
import sys
import time

from ..safetext import printable_value
from .. import paths
from .audit import DB_NAME, default_db_path, read_events


def _fmt(r: dict) -> str:
    """One row as a line. Every text field goes through safetext.printable: rows are escaped when
    written, and this also keeps rows of older databases from reaching the terminal raw."""
    r = {k: printable_value(v) for k, v in r.items()}
    ts = datetime.datetime.fromtimestamp(r["ts"]).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]
    status = "" if r.get("status") is None else str(r["status"])
    size = ""
    if r.get("bytes_out") is not None or r.get("bytes_in") is not None:
        size = f"{r.get('bytes_out') or 0}>{r.get('bytes_in') or 0}B"
    dur = "" if r.get("duration_ms") is None else f"{r['duration_ms']:.0f}ms"
    what = " ".join(x for x in (r.get("method") or "", r.get("url") or "") if x)
    count = f" x{r['count']}" if (r.get("count") or 1) > 1 else ""
    node = f"@{r['node']} " if r.get("node") else ""
    rule, code = r.get("rule") or "", r.get("code") or ""
    tag = rule if not code or code == rule else (f"{rule}; {code}" if rule else code)
    return (f"{ts} {node}{r['kernel'][:12]:12} {r['kind']:9} {(r.get('decision') or ''):10} {status:>3} {what} "
            f"{size} {dur} [{tag}{count}] {r.get('reason') or ''}").rstrip()


def _audit(args) -> int:
    db = args.db or default_db_path()
    last = 0
    first = True
    try:
        while True:
            rows = read_events(db, kernel=args.kernel, after_id=last, limit=args.limit if first else None)
            first = False
            for r in rows:
                last = max(last, r["id"])
                # json.dumps escapes every non-ASCII and control character (ensure_ascii)
                print(json.dumps(r, ensure_ascii=True) if args.json else _fmt(r), flush=True)
            if not args.follow:
                return 0
            time.sleep(0.5)
    except KeyboardInterrupt:
        return 0
    except BrokenPipeError:
        return 0


def _ca(args) -> int:
    from .ca import ca_cert_pem
    pem = ca_cert_pem()
    if args.out:
        with open(args.out, "wb") as f:
            f.write(pem)
    else:
        sys.stdout.write(pem.decode())
    return 0


def add_parser(subparsers) -> None:
    a = subparsers.add_parser("audit", help="show the egress audit log (DNS, connections, HTTP)",
                              description="Read the audit database written by the egress proxy and bridges.")
    a.add_argument("--kernel", metavar="ID", help="only this kernel's events")
    a.add_argument("--follow", "-f", action="store_true", help="keep printing new events")
    a.add_argument("--json", action="store_true", help="one JSON object per line")
    a.add_argument("--limit", type=int, default=200, metavar="N", help="show the last N events first (default 200)")
    a.add_argument("--db", metavar="FILE", help=f"audit database (default: {paths.data_dir() / DB_NAME})")  # help makes no dir
    a.set_defaults(func=_audit)
    p = subparsers.add_parser("proxy", help="egress proxy utilities")
    sub = p.add_subparsers(dest="proxy_cmd", required=True)
    c = sub.add_parser("ca", help="print the interception CA certificate (PEM) the guest trusts")
    c.add_argument("--out", metavar="FILE", help="write it to FILE instead of stdout")
    c.set_defaults(func=_ca)


def main(argv: list[str] | None = None) -> int:
    from ..cli import group_main
    return group_main(add_parser, argv)


if __name__ == "__main__":
    sys.exit(main())
