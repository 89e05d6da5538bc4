"""Egress proxy benchmark: the same HTTPS downloads direct, through capsem's egress path, and through
stock mitmproxy on the same path, side by side in one run.

    .venv/bin/python bench/proxy.py [--seconds 4] [--rounds 3] [--big-count 8] [--workers 1] [--json F]

Direct:  client --TLS--> upstream (127.0.0.1)
capsem:  client --Unix socket (guest egress protocol, as vsock delivers it)--> EgressBridge
         --SOCKS5--> proxy service (mitmproxy, TLS interception, policy/audit addons) --TLS--> upstream
stock:   the same client and EgressBridge --SOCKS5--> stock `mitmdump -q` from the same .venv-proxy
         (its default addons and nothing of capsem's: SOCKS5 with --proxyauth, the same CA for TLS
         interception, the same upstream CA, verifying upstream), `--workers` processes like capsem's
         service. Stock has no resolve map, so its bridge asks SOCKS5 for 127.0.0.1 itself; the client
         still sends SNI and Host bench.test.example (what upstream verification checks).

Small bodies (1 KiB): requests/s and p50/p99 latency at concurrency 1, 16, 64 over keep-alive
connections. Large bodies (10 MiB): MiB/s at concurrency 1 and 4. Each configuration runs once per
round, in alternating order, for --rounds rounds: the machine is shared and noisy, so the figure is the
capsem/stock ratio per round (and its median), with the load average printed before and after.
Everything (client, bridge, proxy, upstream) shares this host's cores, so absolute numbers understate
a dedicated proxy. Reference (a Rust MITM proxy in this field, measured elsewhere): ~2,550 req/s at c=64
and ~31 MiB/s for 10 MiB bodies. Small-body lines also give the CPU milliseconds per request of each
process (Linux): requests/s follow the other tenants' load; CPU per request much less so.

CAPSEM_PROXY_PROFILE=DIR (inherited by the proxy workers) writes a cProfile of each capsem worker to
DIR/proxy-<pid>.prof when it stops (capsem_vm/proxy/server.py).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import shutil
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "guest-agent"), str(REPO / "tests")]

from capsem_agent import protocol  # noqa: E402

from capsem_vm.policy import parse_policy  # noqa: E402
from capsem_vm.proxy import AuditLog, EgressBridge, ProxyService, ca_cert_pem  # noqa: E402
from capsem_vm.proxy.service import ProxyEndpoint  # noqa: E402
from proxy_helpers import make_ca, make_leaf, write_pem  # noqa: E402

HOST = "bench.test.example"
SMALL, BIG = 1024, 10 << 20

UPSTREAM = r'''
import asyncio, ssl, sys
small = b"x" * 1024
chunk = b"y" * 262144
async def handle(r, w):
    try:
        while True:
            head = await r.readuntil(b"\r\n\r\n")
            n = int(head.split(b" ", 2)[1].rsplit(b"/", 1)[1])
            w.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nContent-Type: application/octet-stream\r\n\r\n" % n)
            if n <= len(small):
                w.write(small[:n])
            else:
                left = n
                while left:
                    part = chunk[:left]; w.write(part); left -= len(part)
                    await w.drain()
            await w.drain()
    except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError):
        pass
    finally:
        w.close()
async def main():
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH); ctx.load_cert_chain(sys.argv[1], sys.argv[2])
    srv = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=ctx, backlog=512)
    print(srv.sockets[0].getsockname()[1], flush=True)
    await srv.serve_forever()
asyncio.run(main())
'''


# stock mitmproxy with only the stock addons capsem's service also loads (no capsem code, no patch,
# asyncio's loop as stock): mitmproxy's own floor per request, which capsem pays too
STOCK_MIN = r"""
import asyncio, os, signal, sys
from mitmproxy import options
from mitmproxy.addons import core, disable_h2c, next_layer, proxyauth, proxyserver, tlsconfig
from mitmproxy.master import Master
port, confdir, upstream_ca, auth, stream = sys.argv[1:6]
async def main():
    opts = options.Options()
    m = Master(opts)
    m.addons.add(core.Core(), proxyserver.Proxyserver(), next_layer.NextLayer(), tlsconfig.TlsConfig(),
                 disable_h2c.DisableH2C(), proxyauth.ProxyAuth())
    opts.update(mode=[f"socks5@127.0.0.1:{port}"], confdir=confdir, ssl_verify_upstream_trusted_ca=upstream_ca,
                proxyauth=auth, connection_strategy="eager")
    if stream:
        opts.update(stream_large_bodies=stream)
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, m.shutdown)
    await m.run()
prof = os.environ.get("CAPSEM_PROXY_PROFILE")
if prof:
    import cProfile
    pr = cProfile.Profile()
    pr.enable()
asyncio.run(main())
if prof:
    pr.disable()
    pr.dump_stats(os.path.join(prof, f"stock-min-{os.getpid()}.prof"))
"""


def cpu_seconds(pid: int) -> float:
    """user+system CPU time of a process (Linux /proc), or 0 where unavailable."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return 0.0


class CpuMeter:
    """CPU time per request of each process of the path: on a shared host requests/s follow the
    load of other tenants, CPU per request much less."""

    def __init__(self, pids: dict[str, list[int]]):
        self.pids = pids

    def _now(self) -> dict[str, float]:
        return {k: sum(cpu_seconds(p) for p in pids) for k, pids in self.pids.items()}

    def start(self):
        self.t0 = self._now()

    def per_request_ms(self, n: int) -> dict[str, float]:
        return {k: (v - self.t0[k]) * 1e3 / max(n, 1) for k, v in self._now().items()}


def fmt_cpu(ms: dict[str, float]) -> str:
    return "cpu/req " + " ".join(f"{k} {v:.2f}" for k, v in ms.items()) + f" = {sum(ms.values()):.2f} ms"


class Conn:
    """One keep-alive HTTPS connection, direct or through the bridge."""

    def __init__(self, reader, writer, port: int):
        self.r, self.w = reader, writer
        self.host = f"{HOST}:{port}"  # the proxy refuses a Host that does not name the port

    @classmethod
    async def direct(cls, port: int, ctx: ssl.SSLContext):
        r, w = await asyncio.open_connection("127.0.0.1", port, ssl=ctx, server_hostname=HOST)
        return cls(r, w, port)

    @classmethod
    async def proxied(cls, egress_path: str, port: int, ctx: ssl.SSLContext, target: str = HOST):
        """Through a bridge; `target` is what the guest asks the bridge for (TLS SNI and Host stay HOST)."""
        r, w = await asyncio.open_unix_connection(egress_path, limit=1 << 20)
        w.write(protocol.encode({"t": "connect", "host": target, "port": port}))
        (n,) = protocol.HEADER.unpack(await r.readexactly(4))
        reply = json.loads(await r.readexactly(n))
        if reply["t"] != "connected":
            raise RuntimeError(f"refused: {reply}")
        await w.start_tls(ctx, server_hostname=HOST)
        return cls(r, w, port)

    async def get(self, size: int) -> int:
        self.w.write(f"GET /n/{size} HTTP/1.1\r\nHost: {self.host}\r\n\r\n".encode())
        head = await self.r.readuntil(b"\r\n\r\n")
        length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length:"))
        left = length
        while left:
            data = await self.r.read(min(left, 1 << 20))
            if not data:
                raise ConnectionError("short body")
            left -= len(data)
        return length

    def close(self):
        self.w.close()


async def run_small(make, conc: int, seconds: float, meter: CpuMeter):
    conns = [await make() for _ in range(conc)]
    meter.start()  # steady state: connections are set up
    lat: list[float] = []
    stop = time.monotonic() + seconds

    async def worker(c):
        while time.monotonic() < stop:
            t = time.perf_counter()
            await c.get(SMALL)
            lat.append(time.perf_counter() - t)
    t0 = time.monotonic()
    await asyncio.gather(*(worker(c) for c in conns))
    elapsed = time.monotonic() - t0
    cpu = meter.per_request_ms(len(lat))
    for c in conns:
        c.close()
    lat.sort()
    return {"rps": len(lat) / elapsed, "p50_ms": lat[len(lat) // 2] * 1e3,
            "p99_ms": lat[min(len(lat) - 1, int(len(lat) * 0.99))] * 1e3, "n": len(lat), "cpu": cpu}


async def run_big(make, conc: int, count: int, meter: CpuMeter):
    conns = [await make() for _ in range(conc)]
    meter.start()
    per = max(1, count // conc)
    times: list[float] = []

    async def worker(c):
        for _ in range(per):
            t = time.perf_counter()
            await c.get(BIG)
            times.append(time.perf_counter() - t)
    t0 = time.monotonic()
    await asyncio.gather(*(worker(c) for c in conns))
    elapsed = time.monotonic() - t0
    cpu = meter.per_request_ms(len(times) * BIG // (1 << 20))  # CPU ms per MiB
    for c in conns:
        c.close()
    times.sort()
    return {"mib_s": len(times) * BIG / elapsed / (1 << 20), "p50_ms": statistics.median(times) * 1e3,
            "p99_ms": times[-1] * 1e3, "n": len(times), "cpu_per_mib": cpu}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def wait_listening(port: int, proc: subprocess.Popen, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"stock mitmdump exited with {proc.returncode}")
        try:
            _, w = await asyncio.open_connection("127.0.0.1", port)
            w.close()
            return
        except OSError:
            await asyncio.sleep(0.1)
    raise RuntimeError("stock mitmdump did not listen in time")


async def start_stock(python: str, n: int, confdir: Path, upstream_ca: str, log: Path, minimal: bool = False,
                      stream: str = ""):
    """n stock mitmproxy processes (SOCKS5 with user/password, the service's CA, the same upstream
    trust), none of capsem's code: `mitmdump -q` (its default addons), or with `minimal` a bare
    Master with only the stock addons capsem also loads. Returns (procs, endpoint for a bridge)."""
    mitmdump = str(Path(python).parent / "mitmdump")
    password = secrets.token_hex(16)
    procs, ports = [], []
    for _ in range(n):
        port = free_port()
        if minimal:
            cmd = [python, "-c", STOCK_MIN, str(port), str(confdir), upstream_ca, f"bench:{password}", stream]
        else:
            cmd = [mitmdump, "-q", "--mode", f"socks5@127.0.0.1:{port}", "--proxyauth", f"bench:{password}",
                   "--set", f"confdir={confdir}", "--set", f"ssl_verify_upstream_trusted_ca={upstream_ca}",
                   "--set", "connection_strategy=eager"] + (["--set", f"stream_large_bodies={stream}"] if stream else [])
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
        procs.append(subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log.open("ab"),
                                      stderr=subprocess.STDOUT, env=env))
        ports.append(port)
    for proc, port in zip(procs, ports):
        await wait_listening(port, proc)
    return procs, ProxyEndpoint("127.0.0.1", tuple(ports), "bench", password)


def loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def median(xs):
    return statistics.median(xs) if xs else float("nan")


async def main(args) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="capsem-bench-"))
    os.environ.setdefault("CAPSEM_DATA_DIR", str(tmp / "data"))
    os.environ.setdefault("CAPSEM_RUNTIME_DIR", str(tmp / "run"))
    ca_key, ca = make_ca("bench upstream CA")
    leaf_key, leaf = make_leaf(ca_key, ca, [HOST], ["127.0.0.1"])
    upstream_ca = write_pem(tmp / "ca.pem", cert=ca)
    up = subprocess.Popen([sys.executable, "-c", UPSTREAM, write_pem(tmp / "l.pem", cert=leaf),
                           write_pem(tmp / "l.key", key=leaf_key)], stdout=subprocess.PIPE, text=True)
    port = int(up.stdout.readline())
    rule = '[[rule]]\nname = "bench"\nhost = "{}"\nport = {}\naddresses = ["127.0.0.1"]\nmethods = ["GET"]\naction = "allow"\n'
    policy = parse_policy(rule.format(HOST, port), "bench.toml")
    stock_policy = parse_policy(rule.format("127.0.0.1", port), "bench-stock.toml")
    service = ProxyService(audit_db=tmp / "audit.sqlite3", upstream_ca=upstream_ca, resolve={HOST: "127.0.0.1"},
                           log_path=tmp / "proxy.log", workers=args.workers)
    await service.start()
    # stock gets a copy of the service's CA (same key type, same interception), in its own confdir
    stock_conf = tmp / "stock-conf"
    stock_conf.mkdir()
    from capsem_vm.proxy.ca import KEY_FILE, ca_dir
    shutil.copy(ca_dir() / KEY_FILE, stock_conf / KEY_FILE)
    stock_procs, stock_endpoint = await start_stock(service.python, len(service.pids), stock_conf, upstream_ca,
                                                    tmp / "stock.log", stream=args.stock_stream)
    min_procs, min_endpoint = await start_stock(service.python, len(service.pids), stock_conf, upstream_ca,
                                                tmp / "stock-min.log", minimal=True, stream=args.stock_stream)
    mitm_version = subprocess.run([service.python, "-c", "import mitmproxy.version as v; print(v.VERSION)"],
                                  capture_output=True, text=True).stdout.strip()
    print(f"proxy workers: capsem {len(service.pids)}, stock mitmdump {len(stock_procs)}, stock-min {len(min_procs)} (mitmproxy {mitm_version}, "
          f"{service.python}); host cores: {os.cpu_count()}", flush=True)
    load_before = loadavg()
    print(f"load average before: {load_before}", flush=True)
    audit = AuditLog(tmp / "audit.sqlite3")
    bridge = EgressBridge("bench", policy, await service.register("bench", policy), audit=audit, max_streams=1024)
    stock_bridge = EgressBridge("bench-stock", stock_policy, stock_endpoint, audit=audit, max_streams=1024)
    min_bridge = EgressBridge("bench-stock-min", stock_policy, min_endpoint, audit=audit, max_streams=1024)
    egress, stock_egress, min_egress = (str(tmp / f"{x}.vsock_5002") for x in "bsm")
    await bridge.start(egress, str(tmp / "b.vsock_5003"))
    await stock_bridge.start(stock_egress, str(tmp / "s.vsock_5003"))
    await min_bridge.start(min_egress, str(tmp / "m.vsock_5003"))
    direct_ctx = ssl.create_default_context(cafile=upstream_ca)
    proxy_ctx = ssl.create_default_context(cadata=ca_cert_pem().decode())
    paths = {"direct": lambda: Conn.direct(port, direct_ctx),
             "capsem": lambda: Conn.proxied(egress, port, proxy_ctx),
             "stock": lambda: Conn.proxied(stock_egress, port, proxy_ctx, target="127.0.0.1"),
             "stock-min": lambda: Conn.proxied(min_egress, port, proxy_ctx, target="127.0.0.1")}
    if args.no_direct:
        del paths["direct"]
    if args.only:  # e.g. to profile one proxy alone
        paths = {k: v for k, v in paths.items() if k == args.only}
    # the bridges run in this process, with the client
    meters = {"direct": CpuMeter({"client": [os.getpid()], "upstream": [up.pid]}),
              "capsem": CpuMeter({"client+bridge": [os.getpid()], "proxy": service.pids, "upstream": [up.pid]}),
              "stock": CpuMeter({"client+bridge": [os.getpid()], "proxy": [p.pid for p in stock_procs],
                                 "upstream": [up.pid]}),
              "stock-min": CpuMeter({"client+bridge": [os.getpid()], "proxy": [p.pid for p in min_procs],
                                     "upstream": [up.pid]})}
    small: dict = {}  # (conc, name) -> [result per round]
    big: dict = {}
    try:
        for rnd in range(args.rounds):
            order = list(paths) if rnd % 2 == 0 else list(reversed(paths))  # alternate who goes first
            print(f"-- round {rnd + 1}/{args.rounds} (order {', '.join(order)}; load {loadavg()})", flush=True)
            for conc in ([] if args.no_small else args.conc):
                for name in order:
                    r = await run_small(paths[name], conc, args.seconds, meters[name])
                    small.setdefault((conc, name), []).append(r)
                    print(f"1 KiB  c={conc:<3} {name:9}  {r['rps']:8.0f} req/s  p50 {r['p50_ms']:7.2f} ms  "
                          f"p99 {r['p99_ms']:7.2f} ms  (n={r['n']})  {fmt_cpu(r['cpu'])}", flush=True)
            for conc in (() if args.no_big else (1, 4)):
                for name in order:
                    r = await run_big(paths[name], conc, args.big_count, meters[name])
                    big.setdefault((conc, name), []).append(r)
                    print(f"10 MiB c={conc:<3} {name:9}  {r['mib_s']:8.1f} MiB/s  p50 {r['p50_ms']:7.0f} ms  "
                          f"max {r['p99_ms']:7.0f} ms  (n={r['n']})  "
                          + fmt_cpu(r["cpu_per_mib"]).replace("cpu/req", "cpu/MiB"), flush=True)
    finally:
        await bridge.close()
        await stock_bridge.close()
        await min_bridge.close()
        await service.close()
        for p in stock_procs + min_procs:
            p.terminate()
        for p in stock_procs + min_procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
        audit.close()
        up.kill()
    load_after = loadavg()
    summary = {"stock_stream_large_bodies": args.stock_stream or None, "load_before": load_before, "load_after": load_after, "workers": len(service.pids),
               "mitmproxy": mitm_version, "python": service.python, "rounds": args.rounds,
               "seconds": args.seconds, "small": {}, "big": {}}
    print(f"\nload average after: {load_after}")
    if args.only:
        return summary
    print(f"\nmedians over {args.rounds} round(s); capsem/stock per round in brackets:")
    for conc in ([] if args.no_small else args.conc):
        line = {}
        for name in paths:
            rs = small[(conc, name)]
            line[name] = {"rps": median([r["rps"] for r in rs]), "p50_ms": median([r["p50_ms"] for r in rs]),
                          "p99_ms": median([r["p99_ms"] for r in rs]),
                          "proxy_cpu_ms": median([r["cpu"].get("proxy", 0.0) for r in rs]),
                          "rounds": rs}
        ratios = [c["rps"] / s["rps"] for c, s in zip(small[(conc, "capsem")], small[(conc, "stock")])]
        ratios_min = [c["rps"] / s["rps"] for c, s in zip(small[(conc, "capsem")], small[(conc, "stock-min")])]
        line["capsem_over_stock"] = {"median": median(ratios), "rounds": ratios}
        line["capsem_over_stock_min"] = {"median": median(ratios_min), "rounds": ratios_min}
        summary["small"][conc] = line
        direct = f"direct {line['direct']['rps']:6.0f}  " if "direct" in line else ""
        print(f"  1 KiB  c={conc:<3} req/s {direct}capsem {line['capsem']['rps']:6.0f}  stock {line['stock']['rps']:6.0f}"
              f"  stock-min {line['stock-min']['rps']:6.0f}"
              f"\n      capsem/stock x{median(ratios):.2f} [{' '.join(f'{x:.2f}' for x in ratios)}]"
              f"  capsem/stock-min x{median(ratios_min):.2f} [{' '.join(f'{x:.2f}' for x in ratios_min)}]"
              f"\n      proxy cpu/req: capsem {line['capsem']['proxy_cpu_ms']:.3f} ms, stock {line['stock']['proxy_cpu_ms']:.3f} ms,"
              f" stock-min {line['stock-min']['proxy_cpu_ms']:.3f} ms")
    for conc in (() if args.no_big else (1, 4)):
        line = {}
        for name in paths:
            rs = big[(conc, name)]
            line[name] = {"mib_s": median([r["mib_s"] for r in rs]),
                          "proxy_cpu_ms_per_mib": median([r["cpu_per_mib"].get("proxy", 0.0) for r in rs]), "rounds": rs}
        ratios = [c["mib_s"] / s["mib_s"] for c, s in zip(big[(conc, "capsem")], big[(conc, "stock")])]
        ratios_min = [c["mib_s"] / s["mib_s"] for c, s in zip(big[(conc, "capsem")], big[(conc, "stock-min")])]
        line["capsem_over_stock"] = {"median": median(ratios), "rounds": ratios}
        line["capsem_over_stock_min"] = {"median": median(ratios_min), "rounds": ratios_min}
        summary["big"][conc] = line
        direct = f"direct {line['direct']['mib_s']:6.1f}  " if "direct" in line else ""
        print(f"  10 MiB c={conc:<3} MiB/s {direct}capsem {line['capsem']['mib_s']:6.1f}  stock {line['stock']['mib_s']:6.1f}"
              f"  stock-min {line['stock-min']['mib_s']:6.1f}"
              f"\n      capsem/stock x{median(ratios):.2f} [{' '.join(f'{x:.2f}' for x in ratios)}]"
              f"  capsem/stock-min x{median(ratios_min):.2f} [{' '.join(f'{x:.2f}' for x in ratios_min)}]"
              f"\n      proxy cpu/MiB: capsem {line['capsem']['proxy_cpu_ms_per_mib']:.2f} ms, stock "
              f"{line['stock']['proxy_cpu_ms_per_mib']:.2f} ms, stock-min {line['stock-min']['proxy_cpu_ms_per_mib']:.2f} ms")
    if 64 in summary["small"] and not args.no_big:
        p64 = summary["small"][64]["capsem"]["rps"]
        pbig = max((summary["big"][c]["capsem"]["mib_s"] for c in summary["big"]), default=float("nan"))
        print(f"\nvs reference (Rust MITM proxy, measured elsewhere: 2550 req/s @c=64, 31 MiB/s @10 MiB): "
              f"capsem {p64:.0f} req/s (x{p64 / 2550:.2f}), {pbig:.1f} MiB/s (x{pbig / 31:.2f})")
    return summary


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=4.0, help="duration of each small-body run")
    ap.add_argument("--big-count", type=int, default=8, help="10 MiB downloads per large-body run")
    ap.add_argument("--workers", type=int, default=None,
                    help="proxy worker processes, capsem's and stock's alike (default: cores, max 4)")
    ap.add_argument("--rounds", type=int, default=3, help="rounds; each runs every configuration once, alternating order")
    ap.add_argument("--conc", type=int, nargs="+", default=[1, 16, 64], help="small-body concurrencies")
    ap.add_argument("--only", choices=["direct", "capsem", "stock", "stock-min"], default=None,
                    help="run this configuration alone (no ratios): to profile one proxy")
    ap.add_argument("--no-small", action="store_true", help="skip the 1 KiB runs")
    ap.add_argument("--stock-stream", default="",
                    help="stock's stream_large_bodies (e.g. 1: stream every body, as capsem does; default: buffer)")
    ap.add_argument("--no-big", action="store_true", help="skip the 10 MiB runs")
    ap.add_argument("--no-direct", action="store_true", help="skip the direct (no proxy) runs")
    ap.add_argument("--json", type=Path, default=None, help="write the results here")
    args = ap.parse_args()
    out = asyncio.run(main(args))
    if args.json:
        args.json.write_text(json.dumps(out, indent=1, default=str) + "\n")
