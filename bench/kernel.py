"""Benchmark: the capsem kernel side by side with a local ipykernel, in one run.

    .venv/bin/python bench/kernel.py [--rounds 50] [--mb 10] [--json FILE]

For a local ipykernel (kernel "python3") and a capsem kernel (ipykernel in its own VM):
  start       KernelManager.start_kernel -> first kernel_info_reply (wait_for_ready)
  execute     round trip of `pass` (execute_request -> execute_reply), median of --rounds
  print       printing --mb MB to stdout, until every byte arrived and the kernel is idle
plus, for the capsem kernel, the same round trips measured by a client *inside the guest* against
the guest kernel's own ports (run through the agent's exec while the kernel runs), so the cost of
the tunnel alone is visible: host-client round trip minus guest-client round trip. The heartbeat
echo (no ipykernel code in the path, only ZMQ) is measured the same way.

Each pair is printed with the ratio capsem/local. The kernelspec is installed into a temp prefix
(put first on JUPYTER_PATH), so the run does not depend on what is installed elsewhere.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import zmq
from jupyter_client import KernelManager
from traitlets.config import Config

STARTUP_TIMEOUT = 600

# Runs inside the guest (root, via the agent's exec): a jupyter_client client on the kernel's
# guest-side ports, read from its connection file (root-only, in the agent's run dir).
GUEST_CLIENT = r"""
import glob, json, statistics, sys, time
import zmq
from jupyter_client import BlockingKernelClient
rounds = int(sys.argv[1])
files = glob.glob('/run/capsem/kernels/*/connection.json')
assert len(files) == 1, files
kc = BlockingKernelClient(connection_file=files[0])
kc.load_connection_file()
kc.start_channels()
kc.wait_for_ready(timeout=300)
def rt():
    t = time.perf_counter()
    msg_id = kc.execute('pass')
    while True:
        r = kc.get_shell_msg(timeout=60)
        if r['parent_header'].get('msg_id') == msg_id:
            return time.perf_counter() - t
for _ in range(5):
    rt()
execs = [rt() for _ in range(rounds)]
kc.stop_channels()
ctx = zmq.Context.instance()
hb = ctx.socket(zmq.REQ)
hb.connect('tcp://127.0.0.1:%d' % kc.hb_port)
def ping():
    t = time.perf_counter()
    hb.send(b'ping')
    hb.recv()
    return time.perf_counter() - t
for _ in range(5):
    ping()
pings = [ping() for _ in range(rounds * 4)]
print(json.dumps({'execute_s': statistics.median(execs), 'hb_s': statistics.median(pings)}))
"""


def install_kernelspec(prefix: Path) -> None:
    subprocess.run([sys.executable, "-m", "capsem_vm.cli", "kernel", "install", "--prefix", str(prefix)],
                   check=True, capture_output=True)
    os.environ["JUPYTER_PATH"] = os.pathsep.join(
        [str(prefix / "share" / "jupyter")] + ([os.environ["JUPYTER_PATH"]] if os.environ.get("JUPYTER_PATH") else []))


def execute_rt(kc, code: str = "pass") -> float:
    t = time.perf_counter()
    msg_id = kc.execute(code)
    while True:
        reply = kc.get_shell_msg(timeout=120)
        if reply["parent_header"].get("msg_id") == msg_id:
            return time.perf_counter() - t


def drain_iopub(kc) -> None:
    while True:
        try:
            kc.get_iopub_msg(timeout=0.2)
        except Exception:
            return


def print_mb(kc, mb: int) -> float:
    size = mb * 1024 * 1024
    t = time.perf_counter()
    msg_id = kc.execute(f"import sys; sys.stdout.write('x' * {size}); sys.stdout.flush()")
    got = 0
    while True:
        msg = kc.get_iopub_msg(timeout=300)
        if msg["parent_header"].get("msg_id") != msg_id:
            continue
        if msg["msg_type"] == "stream":
            got += len(msg["content"]["text"])
        elif msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
            break
    elapsed = time.perf_counter() - t
    if got != size:
        raise RuntimeError(f"printed {size} bytes, received {got}")
    return elapsed


def hb_rt(km, rounds: int) -> float:
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.REQ)
    sock.linger = 0
    sock.connect(f"tcp://{km.ip}:{km.hb_port}")
    try:
        def ping():
            t = time.perf_counter()
            sock.send(b"ping")
            sock.recv()
            return time.perf_counter() - t
        for _ in range(5):
            ping()
        return statistics.median(ping() for _ in range(rounds))
    finally:
        sock.close()


def guest_client(km, rounds: int) -> dict:
    from capsem_kernel import loop_thread

    vm = km.provisioner.kernel_vm.vm

    async def run():
        proc = await vm.control.exec(["python3", "-c", GUEST_CLIENT, str(rounds)])
        out, err = bytearray(), bytearray()
        async for fd, data in proc.output():
            (err if fd == 2 else out).extend(data)
        if proc.result.code != 0:
            raise RuntimeError(f"guest client failed ({proc.result.code}): {err.decode()[-2000:]}")
        return json.loads(out.decode().strip().splitlines()[-1])

    return loop_thread.run_sync(run(), timeout=900)


def measure(kernel_name: str, cwd: str, rounds: int, mb: int, guest: bool, config=None) -> dict:
    km = KernelManager(kernel_name=kernel_name, config=config or Config())
    t0 = time.perf_counter()
    km.start_kernel(cwd=cwd)
    launched = time.perf_counter() - t0
    kc = km.client()
    kc.start_channels()
    try:
        kc.wait_for_ready(timeout=STARTUP_TIMEOUT)
        result = {"start_s": time.perf_counter() - t0, "launch_s": launched}
        drain_iopub(kc)
        for _ in range(5):
            execute_rt(kc)
        samples = [execute_rt(kc) for _ in range(rounds)]
        result["execute_s"] = statistics.median(samples)
        result["execute_min_s"] = min(samples)
        drain_iopub(kc)
        result["hb_s"] = hb_rt(km, rounds * 4)
        result["print_s"] = print_mb(kc, mb)
        if guest:
            result["vm"] = km.provisioner.kernel_vm.info()
            inside = guest_client(km, rounds)
            result["guest_execute_s"] = inside["execute_s"]
            result["guest_hb_s"] = inside["hb_s"]
        return result
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)


def fmt(seconds: float) -> str:
    return f"{seconds * 1000:10.2f} ms" if seconds < 1 else f"{seconds:10.2f} s "


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=50, help="execute round trips (median)")
    parser.add_argument("--mb", type=int, default=10, help="MB printed to stdout")
    parser.add_argument("--cpus", type=int, help="guest vCPUs (default: the provisioner's)")
    parser.add_argument("--memory", type=int, metavar="MB", help="guest memory (default: the provisioner's)")
    parser.add_argument("--json", metavar="FILE", help="also write the raw numbers here")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="capsem-bench-") as tmp:
        install_kernelspec(Path(tmp) / "prefix")
        cwd = Path(tmp) / "work"
        cwd.mkdir()
        print(f"load average before: {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs", flush=True)
        local = measure("python3", str(cwd), args.rounds, args.mb, guest=False)
        print("local ipykernel done", flush=True)
        settings = {k: v for k, v in (("cpus", args.cpus), ("memory_mb", args.memory)) if v is not None}
        capsem = measure("capsem", str(cwd), args.rounds, args.mb, guest=True,
                         config=Config({"CapsemProvisioner": settings}))
        print(f"load average after: {os.getloadavg()[0]:.2f}\n", flush=True)

    rows = [("start -> first kernel_info_reply", "start_s"),
            (f"execute `pass` round trip (median of {args.rounds})", "execute_s"),
            (f"heartbeat echo round trip (median of {args.rounds * 4})", "hb_s"),
            (f"print {args.mb} MB to stdout", "print_s")]
    print(f"{'':50} {'local':>13} {'capsem':>13} {'ratio':>8}")
    for label, key in rows:
        print(f"{label:50} {fmt(local[key])} {fmt(capsem[key])} {capsem[key] / local[key]:8.1f}x")
    print()
    vm = capsem["vm"]
    timings = vm.get("timings", {})
    print(f"capsem start breakdown: VM ready {timings.get('ready_s', 0):.1f} s (agent hello "
          f"{timings.get('hello_s', 0):.1f} s after QEMU start; guest boot {vm.get('boot')}), "
          f"launch_kernel returned after {capsem['launch_s']:.1f} s, first kernel_info_reply after "
          f"{capsem['start_s']:.1f} s ({vm.get('accel')}, {vm.get('cpus')} vCPUs, {vm.get('memory_mb')} MB)")
    print()
    tunnel = capsem["execute_s"] - capsem["guest_execute_s"]
    tunnel_hb = capsem["hb_s"] - capsem["guest_hb_s"]
    print(f"{'client inside the guest vs on the host':50} {'in guest':>13} {'host':>13} {'tunnel':>11}")
    print(f"{'execute `pass` round trip':50} {fmt(capsem['guest_execute_s'])} {fmt(capsem['execute_s'])} "
          f"{tunnel * 1000:+8.2f} ms")
    print(f"{'heartbeat echo round trip':50} {fmt(capsem['guest_hb_s'])} {fmt(capsem['hb_s'])} "
          f"{tunnel_hb * 1000:+8.2f} ms")
    print(f"\ntunnel overhead per round trip: {tunnel * 1000:.2f} ms (execute), {tunnel_hb * 1000:.2f} ms "
          f"(heartbeat); target < 0.5 ms")
    if args.json:
        Path(args.json).write_text(json.dumps({"local": local, "capsem": capsem}, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
