"""Chaos: a site folder full of damaged increment files. Each is recorded with a reason and
skipped, never moved or changed; the site goes on with its next file, and every good row is
trained exactly once."""

from __future__ import annotations

import hashlib
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.helpers import assert_rows_exactly_once, tiny_config
from tests.ray_fixtures import served_metrics
from trainer.checkpoint import all_manifests
from trainer.coordinator import run_training

pytestmark = pytest.mark.integration


def digests(folder) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_bad_files_are_recorded_skipped_and_left_untouched(ray_cluster, demo_root, notes_site,
                                                           tmp_path):
    site = tmp_path / "mixed"
    site.mkdir()
    lines = (notes_site / "part-0.jsonl").read_text().splitlines()
    good = [json.loads(line)["body"] for line in lines]
    (site / "01-good.jsonl").write_text("".join(json.dumps({"body": t}) + "\n" for t in good[:4]))
    (site / "02-corrupt.parquet").write_bytes(b"PAR1" + bytes(range(256)) * 4)
    (site / "03-empty.jsonl").write_bytes(b"")
    (site / "04-nocolumn.jsonl").write_text('{"text": "the wrong column"}\n')
    pq.write_table(pa.table({"body": [1, 2, 3]}), site / "05-numbers.parquet")
    (site / "06-latin1.txt").write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    (site / "07-huge.jsonl").write_text(json.dumps({"body": "word " * 4_000_000}) + "\n")
    (site / "08-good.jsonl").write_text("".join(json.dumps({"body": t}) + "\n" for t in good[4:]))
    run_dir = tmp_path / "run"
    config = tiny_config(demo_root, site, run_dir, rounds=3, **{"worker.local_steps": 4})
    # A link out of the folder is refused by the config check; one that appears later (the
    # folder is the user's) is refused by the worker.
    outside = tmp_path / "elsewhere.jsonl"
    outside.write_text(json.dumps({"body": "not this site's data"}) + "\n")
    (site / "075-link.jsonl").symlink_to(outside)
    before = digests(site)
    run_training(config)

    assert digests(site) == before  # nothing moved, renamed, deleted or rewritten
    bad = ["02-corrupt.parquet", "03-empty.jsonl", "04-nocolumn.jsonl", "05-numbers.parquet",
           "06-latin1.txt", "07-huge.jsonl", "075-link.jsonl"]
    records = [json.loads(line) for line in
               (run_dir / "quarantine" / "notes.jsonl").read_text().splitlines()]
    assert sorted(r["name"] for r in records) == sorted(bad)  # each recorded once
    reasons = {r["name"]: r["reason"] for r in records}
    assert "empty file" in reasons["03-empty.jsonl"]
    assert "no column 'body'" in reasons["04-nocolumn.jsonl"]
    assert "expected strings" in reasons["05-numbers.parquet"]
    assert "not UTF-8" in reasons["06-latin1.txt"]
    assert "max_row_chars" in reasons["07-huge.jsonl"]
    assert "leads out of the site's folder" in reasons["075-link.jsonl"]
    for record in records:  # enough to find the very file later
        assert record["size"] == (site / record["name"]).stat().st_size
        assert record["sha256"] == before[record["name"]] and record["mtime"] > 0

    manifests = all_manifests(run_dir)
    assert manifests[-1]["round"] == 3
    recorded = sorted(q["name"] for m in manifests for q in m["quarantined"])
    assert recorded == sorted(bad)
    assert manifests[-1]["skipped"]["notes"] == sorted(bad)
    ranges = assert_rows_exactly_once(run_dir, "notes", text_column="body")
    trained = {r["file"].rsplit("/", 1)[-1]: r["end_row"] for r in ranges}
    assert trained.get("01-good.jsonl") == 4 and "08-good.jsonl" in trained
    served = served_metrics(f"http://127.0.0.1:{ray_cluster['metrics_port']}/metrics",
                            run=run_dir.name, wait_for={"ray_tributary_quarantined_files_total"})
    assert "ray_tributary_quarantined_files_total" in served
