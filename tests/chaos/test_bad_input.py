"""Chaos: a site folder full of damaged increment files. Each is quarantined with a reason,
the site goes on with its next file, and every good row is trained exactly once."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.helpers import assert_rows_exactly_once, tiny_config
from trainer.checkpoint import all_manifests
from trainer.coordinator import run_training

pytestmark = pytest.mark.integration


def test_bad_files_are_quarantined_and_the_run_goes_on(ray_cluster, demo_root, notes_site,
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
    run_training(config)

    quarantine = run_dir / "quarantine" / "notes"
    bad = ["02-corrupt.parquet", "03-empty.jsonl", "04-nocolumn.jsonl", "05-numbers.parquet",
           "06-latin1.txt", "07-huge.jsonl"]
    assert sorted(p.name for p in quarantine.iterdir() if not p.name.endswith(".reason.txt")) == bad
    reasons = {name: (quarantine / f"{name}.reason.txt").read_text() for name in bad}
    assert "empty file" in reasons["03-empty.jsonl"]
    assert "no column 'body'" in reasons["04-nocolumn.jsonl"]
    assert "expected strings" in reasons["05-numbers.parquet"]
    assert "not UTF-8" in reasons["06-latin1.txt"]
    assert "max_row_chars" in reasons["07-huge.jsonl"]
    assert sorted(p.name for p in site.iterdir()) == ["01-good.jsonl", "08-good.jsonl"]

    manifests = all_manifests(run_dir)
    assert manifests[-1]["round"] == 3
    recorded = sorted(q["file"].rsplit("/", 1)[-1] for m in manifests for q in m["quarantined"])
    assert recorded == bad
    ranges = assert_rows_exactly_once(run_dir, "notes", text_column="body")
    trained = {r["file"].rsplit("/", 1)[-1]: r["end_row"] for r in ranges}
    assert trained.get("01-good.jsonl") == 4 and "08-good.jsonl" in trained
