"""AsyncSandbox, and several sandboxes at once in one process: two real capsem kernels (two VMs)
started and used concurrently from one asyncio loop. tests/test_sandbox.py covers the API itself."""

from __future__ import annotations

import asyncio
import os
import threading
import time

import pytest

from host_helpers import helper_processes

pytestmark = pytest.mark.vm


async def test_two_async_sandboxes_at_once(image_dir, tmp_path, monkeypatch):
    from capsem_kernel import AsyncSandbox
    rt = tmp_path / "rt"
    rt.mkdir(mode=0o700)
    monkeypatch.setenv("CAPSEM_RUNTIME_DIR", str(rt))
    monkeypatch.setenv("CAPSEM_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("CAPSEM_CONFIG_DIR", str(tmp_path / "config"))  # no user policy: deny-all
    folders = [tmp_path / "a", tmp_path / "b"]
    for f in folders:
        f.mkdir()
        os.chmod(f, 0o755)
    t0 = time.monotonic()
    a, b = await asyncio.gather(*(AsyncSandbox.create(folder=f, use_pool=False) for f in folders))
    print(f"\ntwo sandboxes ready in {time.monotonic() - t0:.1f} s")
    try:
        assert a.kernel_id != b.kernel_id
        assert (await a.info())["runtime_dir"] != (await b.info())["runtime_dir"]  # a VM each
        loop_thread = threading.get_ident()
        seen = []

        def on_stdout(m):
            seen.append((threading.get_ident(), m.line))

        ra, rb = await asyncio.gather(a.run_code("who = 'a'\nprint(who)", on_stdout=on_stdout),
                                      b.run_code("who = 'b'\nwho"))
        assert ra.logs.stdout == ["a\n"] and rb.text == "'b'"
        assert seen == [(loop_thread, "a\n")]  # callbacks run on the caller's loop
        assert (await a.run_code("who")).text == "'a'" and (await b.run_code("who")).text == "'b'"
        ca, cb = await asyncio.gather(a.commands.run("ls"), b.commands.run("pwd"))
        assert cb.stdout.strip() == str(folders[1]) and ca.exit_code == 0

        # cancelling a run_code interrupts the cell; the sandbox stays usable
        task = asyncio.ensure_future(a.run_code("import time\ntime.sleep(600)"))
        await asyncio.sleep(3)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        t1 = time.monotonic()
        assert (await a.run_code("who", timeout=120)).text == "'a'"
        assert time.monotonic() - t1 < 60
        assert await a.is_alive() and await b.is_alive()
    finally:
        await asyncio.gather(a.close(), b.close())
    deadline = time.monotonic() + 30
    while left := helper_processes(str(rt), *map(str, folders)):
        assert time.monotonic() < deadline, f"VM processes left after close: {left}"
        await asyncio.sleep(0.2)
    assert all(f.is_dir() for f in folders)  # given folders are never removed
