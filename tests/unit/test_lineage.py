"""`tributary lineage`: which versions saw a file's rows or a site's data, and how."""

from __future__ import annotations

import pytest

from trainer.checkpoint import write_json
from trainer.lineage import Query, lineage, render


def manifest(run, name, *, parent, rows=None, replay=0, status="accepted", retried=None):
    folder = run / "versions" / ("rejected/" if status == "rejected" else "") / name
    folder.mkdir(parents=True)
    write_json(folder / "manifest.json", {
        "name": name, "version": int(name[1:]), "parent": parent, "status": status,
        "increments": rows or {}, "retried": retried or {},
        "tokens": {"a": {"new": 1, "replay": replay}, "b": {"new": 1, "replay": replay}}})


def span(file, start, end):
    return {"file": file, "start_row": start, "end_row": end}


@pytest.fixture
def run(tmp_path):
    """v1 reads a.txt rows 0-10 (site a); v2 is rejected after reading b's rows; v3 retrains
    without replay; v4 trains with replay; b.txt's rows are first accepted in v4."""
    a, b = str(tmp_path / "a.txt"), str(tmp_path / "b.txt")
    run = tmp_path / "run"
    manifest(run, "v0000", parent=None)
    manifest(run, "v0001", parent="v0000", rows={"a": [span(a, 0, 10)]})
    manifest(run, "v0002", parent="v0001", status="rejected", rows={},
             retried={"b": [span(b, 0, 4)]})
    manifest(run, "v0003", parent="v0001", rows={"a": [span(a, 10, 20)]})
    manifest(run, "v0004", parent="v0003", rows={"b": [span(b, 0, 4)]}, replay=8)
    return run, a, b


def test_direct_rows_then_replay_then_descendants(run):
    run, a, _ = run
    touches = lineage(run, Query.of(file=a, site=None, rows="12:13"))
    assert [(t.version, t.how) for t in touches] == [("v0003", "direct"), ("v0004", "replay")]
    first = lineage(run, Query.of(file=a, site=None, rows="0:5"))
    assert [(t.version, t.status, t.how) for t in first] == [
        ("v0001", "accepted", "direct"), ("v0002", "rejected", "inherited"),
        ("v0003", "accepted", "inherited"), ("v0004", "accepted", "replay")]
    assert first[0].rows == [{"site": "a", "file": a, "start_row": 0, "end_row": 10}]
    assert "v0001    accepted  direct     a: a.txt [0, 10)" in render(first)


def test_a_rejected_candidates_retried_rows_count_and_replay_scope_is_per_site(run):
    run, _, b = run
    assert [(t.version, t.how) for t in lineage(run, Query.of(file=b, site=None, rows=None))] \
        == [("v0002", "direct"), ("v0004", "direct")]
    by_site = lineage(run, Query.of(file=None, site="a", rows=None), replay_scope="site")
    # With replay.scope: site only site a's own samples could hold a's rows; v0004 trained
    # both sites with replay, so it counts (site a's replay), as does everything built on v1.
    assert [(t.version, t.how) for t in by_site] == [
        ("v0001", "direct"), ("v0002", "inherited"), ("v0003", "direct"), ("v0004", "replay")]
    assert lineage(run, Query.of(file=str(run / "never.txt"), site=None, rows=None)) == []


def test_a_query_must_name_its_data():
    with pytest.raises(ValueError, match="--file PATH or --site NAME"):
        Query.of(file=None, site=None, rows=None)
    with pytest.raises(ValueError, match="needs --file"):
        Query.of(file=None, site="a", rows="0:1")
    with pytest.raises(ValueError, match="expected A:B"):
        Query.of(file="x", site=None, rows="7")
    with pytest.raises(ValueError, match="0 <= A < B"):
        Query.of(file="x", site=None, rows="5:5")
