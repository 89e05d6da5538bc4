"""capsem_vm.proxy.tuning: which event loop the proxy service runs on."""

import pytest
from hypothesis import given, strategies as st

from capsem_vm.proxy.tuning import uvloop_usable


@pytest.mark.parametrize("python, version, usable", [
    ((3, 11), "0.23.1", True),     # no eager task factory before 3.12: any uvloop
    ((3, 12), "0.21.0", True),
    ((3, 12), "0.22.0", False),    # passes eager_start= to 3.12's eager_task_factory: the proxy dies
    ((3, 13), "0.22.1", False),
    ((3, 13), "1.0", False),
    ((3, 13), "0.21.0", True),
    ((3, 13), "garbage", False),   # an unknown version on an affected Python: the safe loop
    ((3, 14), "0.23.0", True),     # 3.14's factory takes eager_start
])
def test_uvloop_is_skipped_where_it_breaks_mitmproxy(python, version, usable):
    assert uvloop_usable(python, version) is usable


@given(st.tuples(st.integers(3, 3), st.integers(0, 20)), st.text(max_size=20))
def test_any_version_text_is_judged_without_raising(python, version):
    assert isinstance(uvloop_usable(python, version), bool)


def test_quiet_gc_freezes_startup_objects_and_still_collects_new_cycles():
    """tuning.quiet_gc (called once the service is ready): startup objects frozen, a larger young
    threshold, and cyclic garbage made afterwards is still freed (in a child: gc state is global)."""
    import subprocess
    import sys
    import textwrap
    script = textwrap.dedent('''
        import gc, weakref
        from capsem_vm.proxy import tuning
        before = gc.get_threshold()
        tuning.quiet_gc()
        assert gc.get_freeze_count() > 0
        assert gc.get_threshold() == (tuning.GC_THRESHOLD0,) + before[1:], gc.get_threshold()
        class Node: pass
        a, b = Node(), Node()
        a.other, b.other = b, a
        gone = weakref.ref(a)
        del a, b
        for _ in range(tuning.GC_THRESHOLD0 * 3):  # allocations alone trigger the young pass
            [None]
            x = {}; x["self"] = x
        assert gone() is None, "a cycle made after quiet_gc was never collected"
        print("ok")
    ''')
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]
