"""Worst-case audit growth under a guest flood (issue 15 item 6): how fast can a hostile guest make
the host's audit database and logs grow?

Floods refusals through the real path a guest reaches, host-side: the egress bridge's Unix
sockets (what vhost-device-vsock delivers for vsock ports 5002/5003), the real proxy service (its
mitmproxy worker processes) and a real HTTP server on 127.0.0.1. Each scenario runs for
--seconds with --clients concurrent guest connections, then the audit barrier, then:

    events/s   refusals (or requests) the guest achieved
    rows/s     audit rows written
    DB/h       growth of the database's used pages, extrapolated to one hour
    logs/h     growth of the proxy service log + the bridge process's log, per hour

The "unbounded" scenario repeats the bridge flood with the rate bound switched off (every event
one row): what the database would do without the aggregation.

    python bench/audit_flood.py [--seconds 15] [--clients 8] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import logging
import os
import socket
import sqlite3
import struct
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "guest-agent"), str(REPO / "tests")]

from capsem_vm.policy import parse_policy  # noqa: E402
from capsem_vm.proxy import AuditLog, EgressBridge, ProxyService, ca_cert_pem  # noqa: E402
from capsem_vm.proxy.audit_rate import RefusalAggregator  # noqa: E402
from proxy_helpers import Guest  # noqa: E402


async def _http_server():
    async def handle(r, w):
        try:
            while await r.readline() not in (b"\r\n", b""):
                pass
            w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
            await w.drain()
        finally:
            w.close()
    srv = await asyncio.start_server(handle, "127.0.0.1", 0)
    return srv, srv.sockets[0].getsockname()[1]


def _used_bytes(db: Path) -> int:
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        page, pages, free = (con.execute(f"PRAGMA {p}").fetchone()[0]
                             for p in ("page_size", "page_count", "freelist_count"))
        return (pages - free) * page
    finally:
        con.close()


def _rows(db: Path) -> int:
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return con.execute("SELECT COUNT(*) FROM events").fetchone()[0]
    finally:
        con.close()


def _size(*files: Path) -> int:
    return sum(f.stat().st_size for f in files if f.exists())


class Flood:
    def __init__(self, w, name: str):
        self.w, self.name = w, name
        self.counter = itertools.count()

    def one(self) -> None:
        w, i = self.w, next(self.counter)
        if self.name in ("bridge-same", "unbounded-same"):
            s, _ = w.g.open("denied.example", 443)
            s.close()
        elif self.name in ("bridge-distinct", "unbounded-distinct"):
            s, _ = w.g.open(f"n{i}-{os.getpid()}.denied.example", 443)
            s.close()
        elif self.name == "protocol":
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.settimeout(10)
                s.connect(w.g.egress_path)
                s.sendall(struct.pack(">I", 5) + b"{nope")
                try:
                    s.recv(4096)
                except OSError:
                    pass
        elif self.name == "dns-distinct":
            w.g.dns(f"q{i}.denied.example", sock=w.dns_sock())
        elif self.name == "proxy-403-same":
            w.g.http("GET", "ok.example", w.port, "/admin")
        elif self.name == "proxy-403-distinct":
            w.g.http("GET", "ok.example", w.port, f"/admin/{i}")
        elif self.name == "allowed":
            w.g.http("GET", "ok.example", w.port, f"/ok/{i}")


async def scenario(w, name: str, seconds: float, clients: int) -> dict:
    unbounded = name.startswith("unbounded")
    w.bridge.audit = w.unbounded if unbounded else w.audit
    db = w.db
    await w.barrier()
    rows0, used0, logs0 = _rows(db), _used_bytes(db), _size(w.proxy_log, w.bridge_log)
    flood = Flood(w, name)
    stop = time.monotonic() + seconds
    done = [0]
    lock = threading.Lock()

    def worker():
        n = 0
        while time.monotonic() < stop:
            try:
                flood.one()
            except OSError:
                pass
            n += 1
        with lock:
            done[0] += n
    t0 = time.monotonic()
    with ThreadPoolExecutor(clients) as pool:
        await asyncio.gather(*(asyncio.get_running_loop().run_in_executor(pool, worker) for _ in range(clients)))
    elapsed = time.monotonic() - t0
    await w.barrier()
    rows, used, logs = _rows(db) - rows0, _used_bytes(db) - used0, _size(w.proxy_log, w.bridge_log) - logs0
    return {"scenario": name, "seconds": round(elapsed, 1), "events_per_s": round(done[0] / elapsed, 1),
            "rows_per_s": round(rows / elapsed, 2), "db_bytes_per_hour": int(used / elapsed * 3600),
            "log_bytes_per_hour": int(logs / elapsed * 3600)}


class World:
    pass


class Unbounded(RefusalAggregator):
    """The baseline: every event its own row (what the database did before the rate bound)."""

    def offer(self, row: dict, now: float) -> dict:
        return {**row, "count": 1, "first_ts": row["ts"], "last_ts": row["ts"]}

    def drain(self, now: float, *, force: bool = False) -> list:
        return []


async def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=15.0)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--json", metavar="FILE")
    ap.add_argument("--only", nargs="*")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="capsem-audit-flood-"))
    os.environ.setdefault("CAPSEM_DATA_DIR", str(tmp / "data"))
    os.environ.setdefault("CAPSEM_RUNTIME_DIR", str(tmp / "run"))
    w = World()
    w.srv, w.port = await _http_server()
    policy = parse_policy(f'[[rule]]\nname = "ok"\nhost = "ok.example"\nport = {w.port}\npaths = ["/ok*"]\n'
                          'addresses = ["127.0.0.1"]\naction = "allow"\n', "flood.toml")
    w.db = tmp / "audit.sqlite3"
    w.proxy_log = tmp / "proxy.log"
    w.bridge_log = tmp / "bridge.log"
    handler = logging.FileHandler(w.bridge_log)
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    logging.getLogger().addHandler(handler)
    logging.getLogger().setLevel(logging.WARNING)
    w.service = ProxyService(audit_db=w.db, resolve={"ok.example": "127.0.0.1"}, log_path=w.proxy_log,
                             workers=args.workers)
    await w.service.start()
    w.audit = AuditLog(w.db)
    w.unbounded = AuditLog(w.db, aggregator=Unbounded())
    ep = await w.service.register("k-flood", policy)
    w.bridge = EgressBridge("k-flood", policy, ep, audit=w.audit)
    egress, dns_path = str(tmp / "k.vsock_5002"), str(tmp / "k.vsock_5003")
    await w.bridge.start(egress, dns_path)
    (tmp / "ca.pem").write_bytes(ca_cert_pem())
    w.g = Guest(egress, dns_path, str(tmp / "ca.pem"))
    local = threading.local()

    def dns_sock():
        s = getattr(local, "s", None)
        if s is None:
            s = local.s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(10)
            s.connect(dns_path)
        return s
    w.dns_sock = dns_sock

    async def barrier():
        await w.service.flush_audit(30)
        await asyncio.to_thread(w.audit.flush, 30)
        await asyncio.to_thread(w.unbounded.flush, 30)
    w.barrier = barrier

    names = args.only or ["bridge-same", "bridge-distinct", "protocol", "dns-distinct", "proxy-403-same",
                          "proxy-403-distinct", "allowed", "unbounded-same", "unbounded-distinct"]
    results = []
    try:
        for name in names:
            r = await scenario(w, name, args.seconds, args.clients)
            results.append(r)
            print(f"{r['scenario']:20} {r['events_per_s']:>9.1f} ev/s {r['rows_per_s']:>9.2f} rows/s "
                  f"DB {r['db_bytes_per_hour'] / 2**20:>9.1f} MiB/h  logs {r['log_bytes_per_hour'] / 2**20:>7.2f} MiB/h",
                  flush=True)
    finally:
        await w.bridge.close()
        await w.service.close()
        w.audit.close()
        w.unbounded.close()
        w.srv.close()
    if args.json:
        Path(args.json).write_text(json.dumps({"clients": args.clients, "workers": args.workers,
                                               "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
