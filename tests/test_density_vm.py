"""Density (issue 19) on a real VM: after the pool's warm-up and reclaim, the guest's free memory
goes back to the host (virtio-balloon free page reporting, punched out of the guest RAM memfd), and
the balloon gives the guest no way to more host memory than its -m."""

import asyncio
import collections
from pathlib import Path

import pytest

from capsem_vm import confine
from capsem_vm.config import VMConfig
from capsem_vm.vm import VM

pytestmark = pytest.mark.vm

MEMORY_MB = 512
# Measured under TCG on the 2-core test machine (bench/density.py, a VM alone): after warm-up and
# reclaim, QEMU's share of guest RAM is 159-175 MB PSS (185 without the change). A generous bound
# for TCG's variance; what fails without the change is the memory not coming back after a free
# (below). The rest of QEMU (TCG cache, heap, kernel image) is printed, not bounded: a figure.
GUEST_RAM_IDLE_BOUND_MB = 240
SETTLE_S = 8  # free page reporting acts ~2 s after a free


def qemu_pss_mb(pid: int) -> dict:
    out = collections.Counter()
    kind = "other"
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        parts = line.split()
        if parts and not parts[0].endswith(":"):
            kind = "guest_ram" if "memory-backend-memfd" in line else "other"
        elif parts and parts[0] in ("Pss:", "Rss:"):
            out[f"{kind}_{parts[0][:-1].lower()}"] += int(parts[1])
    return {k: v / 1024 for k, v in out.items()}


async def _sh(vm, script: str) -> str:
    proc = await vm.control.exec(["sh", "-c", script])
    out = bytearray()
    async for _, data in proc.output():
        out.extend(data)
    return out.decode()


async def _settled(pid: int, done, timeout: float = 60.0) -> dict:
    """QEMU's PSS once `done(figures)` holds, or the last figures after `timeout` s: the guest reports
    free pages in batches a few seconds apart, later on a loaded host."""
    await asyncio.sleep(SETTLE_S)
    deadline = asyncio.get_running_loop().time() + timeout
    figures = qemu_pss_mb(pid)
    while not done(figures) and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(1.0)
        figures = qemu_pss_mb(pid)
    return figures


async def test_pooled_vm_returns_free_memory_and_stays_within_its_memory(image_dir, runtime_root):
    async with VM(VMConfig(memory_mb=MEMORY_MB, cpus=2)) as vm:
        pid = confine.program_pid(vm.qemu.pid)
        # as the pool keeper does: warm ipykernel, then reclaim
        reply = await vm.control.request({"t": "kernel_prewarm", "wait": 600, "preinit": True}, timeout=630)
        assert reply.get("ready")
        reply = await vm.control.request({"t": "reclaim"}, timeout=60)
        assert reply["errors"] == [] and reply["free_kb_after"] >= reply["free_kb_before"]
        idle = await _settled(pid, lambda m: m["guest_ram_pss"] <= GUEST_RAM_IDLE_BOUND_MB)
        assert idle["guest_ram_pss"] <= GUEST_RAM_IDLE_BOUND_MB, idle
        # QEMU's own memory (TCG cache, heap, the kernel image mapping) is a figure, not behaviour of
        # the balloon: bench/density.py reports it (123-163 MB for one idle VM, varying with load)
        print(f"\nidle QEMU: {idle}")

        # memory the guest touches and frees comes back to the host
        await _sh(vm, "python3 -c 'b = bytearray(200 << 20); b[::4096] = bytes(len(b[::4096]))'")
        after = await _settled(pid, lambda m: m["guest_ram_pss"] <= idle["guest_ram_pss"] + 40)
        assert after["guest_ram_pss"] <= idle["guest_ram_pss"] + 40, (idle, after)

        # The guest can report free pages and inflate/deflate the balloon within its own RAM, never
        # get more: it touches far more than -m (the OOM killer ends that process), and the host
        # holds at most -m of guest RAM, the balloon still at -m, the guest still seeing <= -m.
        await _sh(vm, "python3 -c '\n"
                      "chunks = []\n"
                      "for _ in range(64):\n"
                      "    b = bytearray(32 << 20); b[::4096] = bytes(len(b[::4096])); chunks.append(b)\n' ; true")
        full = await _settled(pid, lambda m: m["guest_ram_pss"] <= idle["guest_ram_pss"] + 40)
        assert full["guest_ram_rss"] <= MEMORY_MB, full
        assert (await vm.monitor.execute("query-balloon"))["actual"] == MEMORY_MB << 20
        mem_total_kb = int((await _sh(vm, "sed -n 's/^MemTotal: *\\([0-9]*\\) kB/\\1/p' /proc/meminfo")).strip())
        assert mem_total_kb <= MEMORY_MB * 1024
        # and it is all handed back once freed
        assert full["guest_ram_pss"] <= idle["guest_ram_pss"] + 40, (idle, full)
        await vm.control.ping()  # the guest survived its OOM
