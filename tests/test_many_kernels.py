"""Several capsem kernels started at once (issue 19's "20 at once", reduced for CI; `make many` runs
the full form, bench/many.py): from a pool of 2, four kernels started together the way
jupyter_client's users start them (bench/fleet.py), two on pooled VMs and two booted cold, each in
its own notebook folder; all run a cell there, and after shutdown nothing is left: no QEMU,
virtiofsd, vsock backend or keeper of this session, no socket in the runtime dir."""

from __future__ import annotations

import asyncio
import importlib.util
import os
import shutil
import stat
import sys
import time
from pathlib import Path

import pytest

import kernel_helpers as kh
from capsem_vm.config import VMConfig
from capsem_vm.errors import AssetVerificationError
from capsem_vm.vm import VM
from test_pool import MEMORY, CPUS, capsem, keeper_pids, start_pool, wait_ready

pytestmark = [pytest.mark.vm, pytest.mark.usefixtures("capsem_kernelspecs"), pytest.mark.timeout(1500)]

_spec = importlib.util.spec_from_file_location("bench_fleet", Path(__file__).parents[1] / "bench" / "fleet.py")
fleet = importlib.util.module_from_spec(_spec)
sys.modules["bench_fleet"] = fleet
_spec.loader.exec_module(fleet)

KERNELS, POOLED = 4, 2


def sockets_in(root: Path) -> list[str]:
    return sorted(str(p) for p in root.rglob("*") if stat.S_ISSOCK(p.lstat().st_mode))


def test_kernels_started_together_from_a_pool_and_cold_all_run_a_cell_and_leave_nothing(tmp_path):
    from traitlets.config import Config
    start_pool(size=POOLED)
    try:
        st = wait_ready(POOLED)
        pool_pid = st["pid"]
        c = Config()
        c.CapsemProvisioner.use_pool = True
        c.CapsemProvisioner.memory_mb = MEMORY
        c.CapsemProvisioner.cpus = CPUS
        starts = []
        for i in range(KERNELS):
            d = tmp_path / f"nb{i}"
            d.mkdir()

            def check(out, d=d, i=i):
                return out.strip() == str(d) and (d / "out.txt").read_text() == f"kernel {i}"

            def note(km, marks):
                marks.info["group"] = "pooled" if km.provisioner.kernel_vm.pooled else "cold"
            starts.append(fleet.jupyter_start(
                "capsem", c, str(d), f"import os; open('out.txt', 'w').write('kernel {i}'); print(os.getcwd())",
                check, timeout=kh.STARTUP_TIMEOUT * 2, on_started=note))
        tmp_path.chmod(0o755)
        result = fleet.run_fleet(starts, pids=lambda: fleet.tree_pids(pool_pid), sample_s=2.0)
        s = result.summary()
        print(fleet.format_summary("capsem", s))
        assert s["ok"] == KERNELS, s["errors"]
        assert s["counts"] == {"pooled": POOLED, "cold": KERNELS - POOLED}
        assert s["peak_processes"].get("qemu", 0) >= KERNELS  # the sampler saw every VM
    finally:
        capsem("pool", "stop")
    kh.wait_gone(timeout=60)
    assert not keeper_pids()
    assert sockets_in(kh._state["runtime_dir"]) == []


async def test_verifying_a_cold_vms_image_does_not_stall_the_loop_all_vms_share(image_dir, runtime_root, tmp_path):
    """Every VM and channel relay of a process lives on one loop (capsem_kernel/loop_thread.py); a
    cold start hashes the image (~600 MB). On the loop, 10 cold starts at once stalled every other
    kernel ~9 s (bench/many.py: all 10 pooled claims finished at the same 8.77 s). A tampered initrd
    (rootfs and kernel hard-linked): the whole image is hashed, then refused, no QEMU."""
    image = tmp_path / "img"
    image.mkdir()
    for f in Path(image_dir).resolve().iterdir():
        if f.name == "initrd.img":
            shutil.copyfile(f, image / f.name)
            with open(image / f.name, "r+b") as g:
                g.seek(-1, os.SEEK_END)
                last = g.read(1)
                g.seek(-1, os.SEEK_END)
                g.write(bytes([last[0] ^ 1]))
        else:
            os.link(f, image / f.name)
    gaps = []

    async def tick():
        while True:
            t = time.perf_counter()
            await asyncio.sleep(0.01)
            gaps.append(time.perf_counter() - t)
    ticker = asyncio.ensure_future(tick())
    await asyncio.sleep(0.05)  # the ticker is asleep when the start begins
    t0 = time.perf_counter()
    with pytest.raises(AssetVerificationError):
        await VM(VMConfig(memory_mb=384, cpus=1, image=str(image))).start()
    took = time.perf_counter() - t0
    ticker.cancel()
    assert took > 0.3, f"hashing took only {took:.2f} s: nothing to measure"
    assert max(gaps, default=took) < took / 2, f"the loop stalled {max(gaps, default=took):.2f} s of {took:.2f} s"
