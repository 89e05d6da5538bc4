"""The chaos suite's framework (issue 21; no tests here, see test_chaos.py).

A round: a real capsem kernel (jupyter_client, as users start it) runs the WORKLOAD cell: a
write+fsync loop into the shared notebook folder, acknowledging each record on stdout only after its
fsync returned, and a request loop through the policy proxy to a real HTTP server on this machine
(egress_world.World). At a moment drawn from a seeded RNG one Fault is injected (SIGKILL of its
victims). Then `check_round` asserts the bounds:
- the client never hangs: a fault that kills the VM has the kernel reported dead (KernelManager
  is_alive() False) within DEAD_BOUND s, with a reason; any other fault leaves the kernel working
  (the cell ends on time, the next one runs);
- no orphans: no process of a dead VM, its runtime dir (sockets, pid files) removed; a killed
  proxy worker is replaced and reaped;
- nothing lost: every record the guest acknowledged is in the host file, whole (its CRC checks).

Adding a fault is one Fault entry: a name, how to find its victims' pids in a Chaos, whether it
kills the kernel, and (if it does) what the reason must start with. Other modules can build their own
list (a keeper, the Jupyter server) and call `run_round` with their own Chaos.

Seeds: CAPSEM_CHAOS_SEED (default DEFAULT_SEED: CI draws the same moments every run, like the
derandomized hypothesis profile), CAPSEM_CHAOS_ROUNDS rounds per fault (default 1). Each round
prints its seed, draw and figures; `summary()` prints the medians.
"""

from __future__ import annotations

import os
import queue
import random
import signal
import statistics
import threading
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from host_helpers import helper_processes

DEAD_BOUND = 5.0    # s from the SIGKILL to "dead" (issue 21, under TCG)
GONE_BOUND = 15.0   # s until no process of a dead VM is left
WORK_BOUND = 60.0   # s a kernel that survived may take to finish its cell and answer the next one
START_ACKS = 20     # records acknowledged before the clock of a round starts
DELAY = (0.2, 4.0)  # s after START_ACKS when the fault hits (drawn)
DURATION = 8.0      # s the workload cell runs when nothing kills it (covers the latest fault + recovery)
DEFAULT_SEED = 21
RECORD_PAD = 120


def seed() -> int:
    return int(os.environ.get("CAPSEM_CHAOS_SEED") or DEFAULT_SEED)


def rounds() -> int:
    return max(1, int(os.environ.get("CAPSEM_CHAOS_ROUNDS") or 1))


@dataclass(frozen=True)
class Fault:
    name: str
    victims: Callable[["Chaos"], list[int]]  # pids to SIGKILL (found at the moment of the fault)
    kills_kernel: bool
    reason: Callable[["Chaos"], str] | None = None  # what the death reason starts with (kills_kernel)


@dataclass
class Chaos:
    """What a round needs: the kernel (km, kc), its notebook folder, the world (proxy, servers)
    and the URL the guest requests. `figures` collects each round's numbers per fault."""
    km: object
    kc: object
    nb: Path
    world: object
    url: str
    figures: dict = field(default_factory=dict)

    @property
    def kernel_vm(self):
        return self.km.provisioner.kernel_vm

    @property
    def runtime_root(self) -> str:
        return self.kernel_vm.info()["runtime_dir"]


WORKLOAD = r'''
import json, os, threading, time, zlib
import requests
stop_at = time.time() + {duration}
net = []
def _net():
    while time.time() < stop_at:
        t = time.time()
        try:
            r = requests.get({url!r}, timeout=10)
            net.append([t, r.status_code, r.headers.get("X-Capsem-Policy") or ""])
        except Exception as exc:
            net.append([t, type(exc).__name__, str(exc)[:120]])
        time.sleep(0.05)
_t = threading.Thread(target=_net, daemon=True)
_t.start()
f = open({file!r}, "ab")
seq = {start}
while time.time() < stop_at:
    body = "%d:%s" % (seq, "x" * {pad})
    f.write(("%s:%08x\n" % (body, zlib.crc32(body.encode()))).encode())
    f.flush()
    os.fsync(f.fileno())
    print(seq, flush=True)  # the acknowledgement: only after fsync returned
    seq += 1
_t.join(15)
print("NET " + json.dumps(net))
'''


def parse_records(data: bytes) -> dict[int, bool]:
    """seq -> whole (CRC matches) for every line of the host file; a torn last line counts as not whole."""
    out: dict[int, bool] = {}
    for line in data.split(b"\n"):
        try:
            body, crc = line.decode().rsplit(":", 1)
            seq = int(body.split(":", 1)[0])
        except ValueError:
            continue
        out[seq] = out.get(seq, False) or f"{zlib.crc32(body.encode()):08x}" == crc
    return out


class Acks:
    """Collects the workload cell's iopub output on a thread: acknowledged seqs, the NET line, errors."""

    def __init__(self, kc, msg_id: str):
        self.kc, self.msg_id = kc, msg_id
        self.acked: list[int] = []
        self.text = ""
        self.idle = threading.Event()
        self.error: dict | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                msg = self.kc.get_iopub_msg(timeout=0.1)
            except queue.Empty:
                continue
            except Exception:  # noqa: BLE001 - the channel closed under us (kernel gone)
                return
            if msg["parent_header"].get("msg_id") != self.msg_id:
                continue
            kind, content = msg["msg_type"], msg["content"]
            if kind == "stream" and content.get("name") == "stdout":
                self.text += content["text"]
                done, _, self.text = self.text.rpartition("\n")
                for line in done.splitlines():
                    if line.isdigit():
                        self.acked.append(int(line))
                    elif line.startswith("NET "):
                        self.net_line = line[4:]
            elif kind == "error":
                self.error = content
            elif kind == "status" and content.get("execution_state") == "idle":
                self.idle.set()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)


def _until(cond, bound: float) -> float | None:
    t0 = time.monotonic()
    while not cond():
        if time.monotonic() - t0 > bound:
            return None
        time.sleep(0.02)
    return time.monotonic() - t0


def run_round(chaos: Chaos, fault: Fault, index: int) -> dict:
    """One seeded round of `fault` against the kernel of `chaos` (alive at the start). Returns the
    round's figures; asserts every bound. A round that kills the kernel leaves it dead: call
    `revive` before the next one."""
    import json
    rng = random.Random(f"{seed()}:{fault.name}:{index}")
    delay = rng.uniform(*DELAY)
    print(f"\nchaos round: fault={fault.name} round={index} seed={seed()} (CAPSEM_CHAOS_SEED) delay={delay:.3f} s")
    records = chaos.nb / f"chaos-{fault.name}-{index}.log"
    root = chaos.runtime_root
    code = WORKLOAD.format(duration=DURATION + delay + START_ACKS * 0.2 + 20, url=chaos.url, file=records.name,
                           start=0, pad=RECORD_PAD)
    acks = Acks(chaos.kc, chaos.kc.execute(code))
    try:
        started = _until(lambda: len(acks.acked) >= START_ACKS or acks.idle.is_set(), 300)
        assert started is not None and not acks.idle.is_set(), f"the workload never ran: {acks.error}"
        time.sleep(delay)
        victims = fault.victims(chaos)
        assert victims, f"{fault.name}: nothing to kill"
        acked_before = len(acks.acked)
        proxy_restarts = chaos.world.runtime.proxy_state().get("restarts", 0)
        for pid in victims:
            os.kill(pid, signal.SIGKILL)
        t_kill = time.monotonic()
        figures = {"fault": fault.name, "round": index, "seed": seed(), "delay": round(delay, 3),
                   "acked_before": acked_before}
        if fault.kills_kernel:
            dead_s = _until(lambda: not chaos.km.is_alive(), DEAD_BOUND)
            assert dead_s is not None, f"{fault.name} killed: the kernel still looks alive after {DEAD_BOUND} s"
            figures["dead_s"] = round(dead_s, 3)
            if fault.reason is not None:
                # the helper's name may follow poll()'s exit code by a moment (when the guest's control
                # connection closes first): both within the bound
                want = fault.reason(chaos)
                reason_s = _until(lambda: (chaos.kernel_vm.info().get("death_reason") or "").startswith(want),
                                  max(0.1, DEAD_BOUND - dead_s))
                assert reason_s is not None, chaos.kernel_vm.info()
                figures["reason_s"] = round(dead_s + reason_s, 3)
            info = chaos.kernel_vm.info()
            # the reason Jupyter gets: poll()'s exit code always; the helper's name when a helper died
            exit_code = getattr(chaos.kernel_vm, "exit_code", None)
            figures["reason"] = info.get("death_reason") or info.get("shutdown_reason") or f"exit code {exit_code}"
            assert info["state"] == "dead" and exit_code is not None, info
            gone_s = _until(lambda: not helper_processes(root) and not os.path.exists(root), GONE_BOUND)
            assert gone_s is not None, f"orphans of the dead VM: {helper_processes(root)}, dir {os.listdir(root) if os.path.exists(root) else '-'}"
            figures["gone_s"] = round(time.monotonic() - t_kill, 3)
            time.sleep(0.5)  # the last iopub messages that left the guest before the kill
        else:
            ended = acks.idle.wait(DURATION + delay + START_ACKS * 0.2 + 20 + WORK_BOUND)
            assert ended, f"{fault.name}: the cell did not end within its bound (the client would hang)"
            acks.stop()  # the next request's messages are run_ok's
            assert acks.error is None, acks.error
            assert chaos.km.is_alive(), (chaos.kernel_vm.info(), getattr(chaos.kernel_vm, "exit_code", None),
                                         len(acks.acked), getattr(acks, "net_line", "")[-500:])
            from kernel_helpers import run_ok
            assert run_ok(chaos.kc, "print('alive')", timeout=WORK_BOUND) == "alive\n"
            state = chaos.world.runtime.proxy_state()
            figures["proxy"] = state
            if fault.name == "proxy-worker":
                assert state["restarts"] > proxy_restarts and state["state"] == "running", state
                figures["restart_s"] = state["last_recovery_s"]
                assert not any(_alive(p) for p in victims), "a killed worker is not reaped"
                net = json.loads(getattr(acks, "net_line", "[]"))
                bad = [x for x in net if x[1] != 200]
                # fail closed during the gap: a cut connection or a 403 naming the reason, never a pass
                assert all(x[1] == 403 and "proxy-restarting" in x[2] or isinstance(x[1], str) for x in bad), bad
                assert net and net[-1][1] == 200, net[-5:]  # egress came back without a kernel restart
                figures["refused"] = len(bad)
    finally:
        acks.stop()
    data = records.read_bytes() if records.exists() else b""
    on_host = parse_records(data)
    lost = [s for s in acks.acked if not on_host.get(s)]
    assert not lost, f"{len(lost)} acknowledged (fsynced) records lost or torn, e.g. {lost[:5]}"
    figures["acked"] = len(acks.acked)
    chaos.figures.setdefault(fault.name, []).append(figures)
    print(f"chaos round result: {json.dumps(figures, default=str)}")
    return figures


def revive(chaos: Chaos) -> None:
    """Restart a dead kernel (a fresh VM), as a user would after a dead-kernel notice."""
    if chaos.km.is_alive():
        return
    chaos.km.restart_kernel(now=True)
    chaos.kc.wait_for_ready(timeout=600)


def summary(figures: dict) -> str:
    lines = []
    for name, rows in figures.items():
        parts = [f"{len(rows)} round(s)"]
        for key in ("dead_s", "reason_s", "gone_s", "restart_s", "sweep_s"):
            vals = [r[key] for r in rows if isinstance(r.get(key), (int, float))]
            if vals:
                parts.append(f"{key} median {statistics.median(vals):.3f} (max {max(vals):.3f})")
        lines.append(f"chaos summary: {name}: " + ", ".join(parts))
    return "\n".join(lines)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def _pids_of(marker: str) -> list[int]:
    return [int(line.split()[0]) for line in helper_processes(marker)]


def pids_named(kind: str, marker: str) -> list[int]:
    """Live helper processes whose program name contains `kind` and command line names `marker`."""
    return [int(line.split()[0]) for line in helper_processes(marker) if kind in line.split(" ", 2)[1]]
