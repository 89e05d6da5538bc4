"""bench/folder.py's pure helpers: variant parsing, the virtiofsd argv it builds, rates and the table."""

import importlib.util
from pathlib import Path

import pytest
from hypothesis import given, strategies as st

from capsem_vm import helpers
from capsem_vm.config import Share
from capsem_vm.virtiofs import virtiofsd_args

_spec = importlib.util.spec_from_file_location("bench_folder", Path(__file__).parents[1] / "bench" / "folder.py")
folder = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(folder)

C_ARGV = virtiofsd_args(helpers.Program("virtiofsd", Path("/usr/lib/qemu/virtiofsd"), "c"), Share(Path("/srv/x/nb"), "nb"), 3)


def test_variants_parse_and_unknown_options_are_refused():
    assert folder.parse_variant("default") == ("default", {})
    assert folder.parse_variant("a=cache=always,writeback,thread-pool-size=4") == \
        ("a", {"cache": "always", "writeback": True, "thread-pool-size": "4"})
    for bad in ("x=cache=fast", "x=thread-pool-size=many", "x=sandbox=none", "x=xattr", "=cache=none", "a b=writeback"):
        with pytest.raises(ValueError):
            folder.parse_variant(bad)


@given(cache=st.sampled_from([None, "auto", "always", "none"]), writeback=st.booleans(),
       pool=st.one_of(st.none(), st.integers(0, 64)))
def test_options_change_only_what_they_name_and_keep_the_confinement(cache, writeback, pool):
    options = {k: v for k, v in (("cache", cache), ("writeback", writeback or None),
                                 ("thread-pool-size", None if pool is None else str(pool))) if v is not None}
    argv = folder.apply_options(C_ARGV, options)
    for kept in ("sandbox=namespace", "no_xattr", "modcaps=-mknod:-setfcap", "--fd=3", "source=/srv/x/nb"):
        assert kept in argv
    assert f"cache={cache or 'auto'}" in argv and sum(a.startswith("cache=") for a in argv) == 1
    assert ("writeback" in argv) == writeback
    assert any(a == f"--thread-pool-size={pool}" for a in argv) == (pool is not None)
    assert argv[:len(C_ARGV)] == [a if not a.startswith("cache=") else f"cache={cache or 'auto'}" for a in C_ARGV]


def test_rates_ratios_and_table():
    run = {"seq_write_s": 2.0, "seq_read_s": 1.0, "reread_s": 0.5, "seq_write_direct_s": None,
           "seq_read_direct_s": None, "create_s": 0.5, "stat_s": 0.1, "read_small_s": 0.2, "unlink_s": 0.1,
           "mmap_shared": "ok"}
    fast = {**run, "seq_write_s": 1.0, "seq_read_s": 0.5}
    assert folder.rate("seq_write_s", 2.0, 100, 500) == pytest.approx(100 * 1048576 / 1e6 / 2)
    assert folder.rate("create_s", 0.5, 100, 500) == 1000
    assert folder.medians([run, fast, fast])["seq_write_s"] == 1.0
    assert "mmap_shared" not in folder.medians([run]) and "seq_write_direct_s" not in folder.medians([run])
    results = {"host": [fast], "tmpfs": [fast], "virtiofs": {"default": [run], "broken": []}}
    assert folder.sequential_ratio(results, "default", 100) == {"seq_write_s": 0.5, "seq_read_s": 0.5}
    text = folder.table(results, 100, 500)
    assert "broken" not in text  # a variant that failed has no column
    ratio_rows = text.split("VirtioFS / guest tmpfs")[1].splitlines()
    assert next(r for r in ratio_rows if r.startswith("seq write + fsync")).split()[-1] == "0.50"
    assert next(r for r in ratio_rows if r.startswith("seq write O_DIRECT")).split()[-1] == "-"
