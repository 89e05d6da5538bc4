"""Benchmark: the remote tunnel (capsem_kernel/remote) against the same local ipykernel used directly.

    .venv/bin/python bench/remote_channels.py [--rounds 200] [--mb 10] [--json FILE]

One local ipykernel; a NodeTunnel and a FrontTunnel on loopback (real mutual TLS 1.3, P-256) in
front of it, on their own event-loop thread as in a front end; two BlockingKernelClients: one on the
kernel's own ports ("direct"), one on the front's local ports ("tunnel"). Measured side by side in
the same run, rounds interleaved (direct, tunnel, direct, ...) so load changes hit both:
  ready      start_channels -> wait_for_ready (tunnel: five TLS handshakes + the kernel_info)
  execute    round trip of `pass` (execute_request -> execute_reply), median and p90
  heartbeat  raw ZMQ REQ echo on the hb port (no ipykernel code in the path)
  print      --mb MB printed to stdout, until the kernel is idle again (bulk through TLS)
Ratios tunnel/direct are printed, with the load average before and after (a shared machine).
Loopback only: it measures what the tunnel adds (TLS, two extra hops through Python), not a
network; a real cluster adds its network's round trip on top.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid

import zmq
from jupyter_client import BlockingKernelClient
from jupyter_client.connect import write_connection_file

from capsem_kernel.remote.identity import TlsIdentity
from capsem_kernel.remote.tunnel import ConnectionClosed, FrontTunnel, NodeTunnel
from capsem_kernel.remote.wire import CHANNELS


class LoopThread:
    def __init__(self):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro, timeout=60):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self):
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


async def open_tunnel(info: dict, key: str):
    front_id, node_id = TlsIdentity.generate("front"), TlsIdentity.generate("node")
    node: NodeTunnel | None = None

    async def on_control(control):
        while True:
            try:
                msg = await control.receive()
            except ConnectionClosed:
                return
            if msg["op"] == "start":
                node.set_targets({ch: ("127.0.0.1", info[f"{ch}_port"]) for ch in CHANNELS})
                await control.send({"op": "ready", "node": "bench", "info": {}})

    node = await NodeTunnel.start("127.0.0.1", node_id, front_id.cert_pem, on_control)
    front = await FrontTunnel.connect("127.0.0.1", node.port, front_id, node_id.cert_pem)
    await front.control.send({"op": "start", "kernel_id": "bench", "key": key.encode().hex(),
                              "signature_scheme": "hmac-sha256", "policy": None, "folder": None,
                              "cwd": None, "env": {}, "extra": {}})
    assert (await front.control.receive())["op"] == "ready"
    ports = await front.open_local_ports()
    return node, front, {**info, **{f"{ch}_port": p for ch, p in ports.items()}}


def ready(info: dict) -> tuple[BlockingKernelClient, float]:
    t = time.perf_counter()
    kc = BlockingKernelClient()
    kc.load_connection_info(info)
    kc.start_channels()
    kc.wait_for_ready(timeout=60)
    return kc, time.perf_counter() - t


def execute_rt(kc: BlockingKernelClient, code: str = "pass") -> float:
    t = time.perf_counter()
    msg_id = kc.execute(code)
    while kc.get_shell_msg(timeout=60)["parent_header"].get("msg_id") != msg_id:
        pass
    return time.perf_counter() - t


def print_mb(kc: BlockingKernelClient, mb: int) -> float:
    t = time.perf_counter()
    msg_id = kc.execute(f"import sys\nfor _ in range({mb * 16}): sys.stdout.write('x' * 65535 + '\\n')")
    while True:
        m = kc.get_iopub_msg(timeout=120)
        if (m["parent_header"].get("msg_id") == msg_id and m["msg_type"] == "status"
                and m["content"]["execution_state"] == "idle"):
            break
    while kc.get_shell_msg(timeout=60)["parent_header"].get("msg_id") != msg_id:
        pass
    return time.perf_counter() - t


def hb_rt(sock) -> float:
    t = time.perf_counter()
    sock.send(b"ping")
    if not sock.poll(10_000):
        raise TimeoutError("no heartbeat echo")
    sock.recv()
    return time.perf_counter() - t


def summary(xs: list[float]) -> dict:
    xs = sorted(xs)
    return {"median_ms": statistics.median(xs) * 1e3, "p90_ms": xs[int(len(xs) * 0.9) - 1] * 1e3,
            "n": len(xs)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=200)
    ap.add_argument("--mb", type=int, default=10)
    ap.add_argument("--json")
    args = ap.parse_args()
    load_before = os.getloadavg()
    d = tempfile.mkdtemp(prefix="capsem-bench-remote-")
    key = uuid.uuid4().hex
    cf = os.path.join(d, "kernel.json")
    _, info = write_connection_file(cf, ip="127.0.0.1", key=key.encode())
    info = dict(info, key=key)
    proc = subprocess.Popen([sys.executable, "-m", "ipykernel_launcher", "-f", cf],
                            env={**os.environ, "IPYTHONDIR": os.path.join(d, "ipython")},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    lt = LoopThread()
    res: dict = {"rounds": args.rounds, "mb": args.mb, "cpus": os.cpu_count()}
    try:
        kc_d, t_ready_warm = ready(info)          # the first one waits for the kernel to start
        node, front, tinfo = lt.run(open_tunnel(info, key))
        readies = {"direct": [], "tunnel": []}
        for _ in range(3):
            for name, i in (("direct", info), ("tunnel", tinfo)):
                kc, t = ready(i)
                readies[name].append(t)
                kc.stop_channels()
        kc_t, _ = ready(tinfo)
        for kc in (kc_d, kc_t):
            for _ in range(10):
                execute_rt(kc)                    # warm up
        ex = {"direct": [], "tunnel": []}
        for _ in range(args.rounds):
            ex["direct"].append(execute_rt(kc_d))
            ex["tunnel"].append(execute_rt(kc_t))
        ctx = zmq.Context()
        hbs = {}
        for name, i in (("direct", info), ("tunnel", tinfo)):
            s = ctx.socket(zmq.REQ)
            s.linger = 0
            s.connect(f"tcp://127.0.0.1:{i['hb_port']}")
            hbs[name] = s
        hb = {"direct": [], "tunnel": []}
        for name in hbs:
            for _ in range(10):
                hb_rt(hbs[name])
        for _ in range(args.rounds):
            for name in ("direct", "tunnel"):
                hb[name].append(hb_rt(hbs[name]))
        for s in hbs.values():
            s.close()
        ctx.term()
        prints = {"direct": [], "tunnel": []}
        if args.mb:
            for _ in range(3):
                prints["direct"].append(print_mb(kc_d, args.mb))
                prints["tunnel"].append(print_mb(kc_t, args.mb))
        kc_d.stop_channels()
        kc_t.stop_channels()
        lt.run(front.close())
        lt.run(node.close())
    finally:
        lt.stop()
        proc.terminate()
        proc.wait(10)
    load_after = os.getloadavg()
    rows = []
    for label, data in (("ready (start_channels->kernel_info)", readies), ("execute `pass`", ex),
                        ("heartbeat echo", hb)):
        sd, st = summary(data["direct"]), summary(data["tunnel"])
        res[label] = {"direct": sd, "tunnel": st}
        rows.append((label, sd["median_ms"], st["median_ms"], sd["p90_ms"], st["p90_ms"]))
    if args.mb:
        pd, pt = statistics.median(prints["direct"]), statistics.median(prints["tunnel"])
        res["print"] = {"direct_s": pd, "tunnel_s": pt, "direct_MBps": args.mb / pd,
                        "tunnel_MBps": args.mb / pt}
    res["load_before"], res["load_after"] = load_before, load_after
    print(f"load average before {load_before}, after {load_after} ({os.cpu_count()} CPUs)")
    print(f"{'':38}{'direct':>10}{'tunnel':>10}{'ratio':>8}   {'p90 d':>8}{'p90 t':>8}")
    for label, d_med, t_med, d_p90, t_p90 in rows:
        print(f"{label + ' (ms)':38}{d_med:10.2f}{t_med:10.2f}{t_med / d_med:8.2f}   "
              f"{d_p90:8.2f}{t_p90:8.2f}")
    print(f"{'added by the tunnel, execute (ms)':38}{'':10}{rows[1][2] - rows[1][1]:10.2f}")
    if args.mb:
        p = res["print"]
        print(f"{f'print {args.mb} MB (s)':38}{p['direct_s']:10.2f}{p['tunnel_s']:10.2f}"
              f"{p['tunnel_s'] / p['direct_s']:8.2f}   ({p['direct_MBps']:.1f} vs {p['tunnel_MBps']:.1f} MB/s)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
