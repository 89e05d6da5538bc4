"""Benchmark: egress from a real guest (one VM) vs the same requests from the host directly.

    CAPSEM_CACHE_DIR=... .venv/bin/python bench/egress_vm.py [--mb 16] [--rounds 20]

Boots one VM with the egress test world's policy (tests/egress_world.py: local HTTP/HTTPS servers
named *.test.example, trusted through a test CA) and measures, with curl and Python requests:
  - HTTPS GET latency (p50/p90): keep-alive and new connections, guest (through the HTTP proxy
    variables) vs host (direct to the server);
  - download MB/s of --mb MiB: guest via the proxy (HTTP and HTTPS), guest transparent (no proxy
    variables: nftables capture), host direct;
  - guest ceilings for context: a Python loopback socket copy, and OpenSSL AES-128-GCM.
Under TCG the guest's own CPU (TLS, Python) dominates; on a KVM host the proxy path does.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "guest-agent"), str(ROOT)]

from egress_world import World  # noqa: E402

from capsem_vm.config import EgressConfig, VMConfig  # noqa: E402
from capsem_vm.vm import VM  # noqa: E402

LATENCY = r"""
import json, sys, time, requests
url, n = sys.argv[1], int(sys.argv[2])
def timed(f, k):
    ts = []
    for _ in range(k):
        t = time.perf_counter(); f(); ts.append(time.perf_counter() - t)
    ts.sort()
    return [round(ts[len(ts) // 2] * 1000, 1), round(ts[min(len(ts) - 1, int(len(ts) * 0.9))] * 1000, 1)]
verify = sys.argv[3] if len(sys.argv) > 3 else True
s = requests.Session(); s.get(url, timeout=120, verify=verify)
print(json.dumps({"keepalive": timed(lambda: s.get(url, timeout=120, verify=verify), n),
                  "fresh": timed(lambda: requests.get(url, timeout=120, verify=verify), max(3, n // 3))}))
"""

LOOPBACK = r"""
import socket, threading, time
l = socket.socket(); l.bind(("127.0.0.1", 0)); l.listen()
def srv():
    c, _ = l.accept(); b = b"x" * 65536
    for _ in range(256): c.sendall(b)
    c.close()
threading.Thread(target=srv).start()
s = socket.create_connection(l.getsockname()); t = time.time(); n = 0
while (d := s.recv(65536)): n += len(d)
print(round(n / (time.time() - t) / 1e6, 1))
"""


async def guest(vm, argv, timeout=900) -> str:
    async def run():
        proc = await vm.control.exec(argv)
        out = bytearray()
        async for fd, data in proc.output():
            if fd == 1:
                out.extend(data)
        return out.decode(errors="replace").strip()
    return await asyncio.wait_for(run(), timeout)


def curl_speed(out: str) -> float:
    return round(float(out.split()[0]) / 1e6, 2)


async def main(args) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="capsem-bench-egress-"))
    os.chmod(tmp, 0o755)
    os.environ.setdefault("CAPSEM_RUNTIME_DIR", str(tmp / "rt"))
    w = await World.create(tmp)
    vm = VM(VMConfig(memory_mb=1024, cpus=2, egress=EgressConfig(policy=str(w.policy_file), kernel_id="bench")))
    t = time.monotonic()
    await vm.start()
    print(f"VM ready in {time.monotonic() - t:.1f} s; egress_setup {vm.egress.setup_reply['seconds']} s "
          f"{vm.egress.setup_reply['steps']}", flush=True)
    n = args.mb << 20
    https, http = f"https://api.test.example:{w.HTTPS}", f"http://api.test.example:{w.HTTP}"
    fmt = ["-s", "-o", "/dev/null", "-w", "%{speed_download} %{time_total}"]
    rows = []
    try:
        lat_guest = json.loads(await guest(vm, ["python3", "-c", LATENCY, https + "/echo", str(args.rounds)]))
        lat_host = json.loads(await asyncio.to_thread(lambda: subprocess.run(
            [sys.executable, "-c", LATENCY, f"https://127.0.0.1:{w.HTTPS}/echo", str(args.rounds), w.upstream_ca],
            capture_output=True, text=True, env={**os.environ, "NO_PROXY": "*"}).stdout))
        rows.append(("HTTPS GET keep-alive p50/p90 ms", lat_guest["keepalive"], lat_host["keepalive"]))
        rows.append(("HTTPS GET new connection p50/p90 ms", lat_guest["fresh"], lat_host["fresh"]))
        host_https = await asyncio.to_thread(lambda: subprocess.run(
            ["curl", "--noproxy", "*", "--cacert", w.upstream_ca, *fmt, f"https://127.0.0.1:{w.HTTPS}/big?n={n}"],
            capture_output=True, text=True).stdout)
        host_http = await asyncio.to_thread(lambda: subprocess.run(
            ["curl", "--noproxy", "*", *fmt, f"http://127.0.0.1:{w.HTTP}/big?n={n}"], capture_output=True, text=True).stdout)
        g_https = await guest(vm, ["curl", *fmt, f"{https}/big?n={n}"])
        g_http = await guest(vm, ["curl", *fmt, f"{http}/big?n={n}"])
        g_transp = await guest(vm, ["curl", "--noproxy", "*", *fmt, f"{https}/big?n={n}"])
        rows.append((f"{args.mb} MiB HTTPS download MB/s (curl)", curl_speed(g_https), curl_speed(host_https)))
        rows.append((f"{args.mb} MiB HTTP download MB/s (curl)", curl_speed(g_http), curl_speed(host_http)))
        rows.append((f"{args.mb} MiB HTTPS transparent MB/s (curl)", curl_speed(g_transp), "-"))
        loop = await guest(vm, ["python3", "-c", LOOPBACK])
        aes = await guest(vm, ["sh", "-c", "openssl speed -seconds 1 -evp aes-128-gcm 2>/dev/null | tail -1"])
        rows.append(("guest Python loopback copy MB/s", loop, "-"))
        rows.append(("guest AES-128-GCM 16 KiB blocks (k/s)", aes.split()[-1] if aes else "?", "-"))
    finally:
        await vm.stop()
        await w.close()  # its egress runtime: the proxy service and the audit log
    width = max(len(r[0]) for r in rows)
    print(f"\n{'':{width}}  {'guest (egress)':>18}  {'host direct':>16}")
    for name, g, h in rows:
        print(f"{name:{width}}  {str(g):>18}  {str(h):>16}")
    print(f"\nhost load average: {os.getloadavg()}")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mb", type=int, default=16, help="download size in MiB")
    ap.add_argument("--rounds", type=int, default=20, help="requests per latency measurement")
    asyncio.run(main(ap.parse_args()))
