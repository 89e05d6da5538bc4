"""The guest agent's reclaim (capsem_agent.reclaim): drops clean caches, then compacts, and
reports what failed instead of raising (a pooled VM that cannot reclaim is still usable)."""

from capsem_agent import reclaim


def test_reclaim_writes_drop_caches_then_compact(tmp_path, monkeypatch):
    drop, compact = tmp_path / "drop_caches", tmp_path / "compact_memory"
    drop.write_text("")
    compact.write_text("")
    monkeypatch.setattr(reclaim, "DROP_CACHES", str(drop))
    monkeypatch.setattr(reclaim, "COMPACT", str(compact))
    out = reclaim.reclaim()
    assert (drop.read_text(), compact.read_text()) == ("3", "1")
    assert out["errors"] == [] and out["seconds"] >= 0


def test_reclaim_reports_failures_without_raising(tmp_path, monkeypatch):
    monkeypatch.setattr(reclaim, "DROP_CACHES", str(tmp_path / "missing" / "drop_caches"))
    monkeypatch.setattr(reclaim, "COMPACT", str(tmp_path / "missing" / "compact_memory"))
    out = reclaim.reclaim()
    assert len(out["errors"]) == 2 and all("missing" in e for e in out["errors"])
