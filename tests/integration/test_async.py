"""merge.mode async on real Ray and DeepSpeed: a fast site does not wait for a slow one, a
slow update lands versions later with its staleness in the lineage, an update too stale is
refused and its rows trained again. The slow site is slowed by a sleep in its worker (the
benchmark slows it with real work: benchmarks/async_vs_sync.py)."""

from __future__ import annotations

import pytest
import ray.cloudpickle

from tests.chaos import misbehaving
from tests.helpers import assert_tiny_rows_exactly_once, tiny_config
from tests.ray_fixtures import ASYNC_METRICS, served_metrics
from trainer.checkpoint import all_manifests
from trainer.coordinator import run_training
from trainer.metrics import read_metrics
from trainer.report import write_report
from trainer.table import render

pytestmark = pytest.mark.integration
ray.cloudpickle.register_pickle_by_value(misbehaving)

ROUNDS = 12
ASYNC = {"merge.mode": "async", "merge.buffer": 1, "merge.staleness_exponent": 0.5}


def lineage_entries(run_dir) -> list[tuple[int, dict]]:
    return [(m["version"], e) for m in all_manifests(run_dir, include_rejected=True)
            for e in m["lineage"]]


def test_a_slow_sites_update_lands_versions_later_with_its_staleness(
        ray_cluster, demo_root, notes_site, tmp_path):
    run_dir = tmp_path / "run"
    config = tiny_config(demo_root, notes_site, run_dir, rounds=ROUNDS, **ASYNC,
                         **{"merge.max_staleness": 50, "run.eval_every": 2})
    run_training(config, worker_cls=misbehaving.paced_worker(site="notes", seconds=3))

    entries = lineage_entries(run_dir)
    for version, entry in entries:  # τ = versions published between its base and its merge
        assert entry["staleness"] == version - 1 - int(entry["base"][1:])
        assert entry["discount"] == pytest.approx((1 + entry["staleness"]) ** -0.5)
    by_site = {s: [e for _, e in entries if e["site"] == s] for s in ("speeches", "notes")}
    assert len(by_site["speeches"]) > len(by_site["notes"]) >= 1, "the fast site waited"
    assert max(e["staleness"] for e in by_site["notes"]) >= 2
    # Weights and evaluation every 2nd version and at the end; every version a manifest.
    versions = run_dir / "versions"
    with_weights = sorted(p.name for p in versions.glob("v*") if any(p.glob("*.safetensors")))
    assert with_weights == [f"v{i:04d}" for i in range(0, ROUNDS + 1, 2)]
    assert sorted(p.name for p in versions.glob("v*")) == [f"v{i:04d}" for i in
                                                         range(ROUNDS + 1)]
    assert (versions / "latest").resolve().name == f"v{ROUNDS:04d}"
    records = read_metrics(run_dir)
    assert [bool(r["eval_perplexity"]) for r in records] == [True] + [False, True] * (ROUNDS // 2)
    rate = records[-1]["updates_per_min"]
    assert rate["speeches"] > rate["notes"] > 0
    assert all(0 <= s < records[-1]["time"] - records[0]["time"]
               for s in records[-1]["idle_seconds"].values())
    assert "stale" in render(records).splitlines()[0]
    assert (run_dir / "report" / "staleness.png") in write_report(run_dir, records)
    url = f"http://127.0.0.1:{ray_cluster['metrics_port']}/metrics"
    assert ASYNC_METRICS <= served_metrics(url, run=run_dir.name, wait_for=ASYNC_METRICS)
    assert_tiny_rows_exactly_once(run_dir)


def test_an_update_over_max_staleness_is_refused_and_its_rows_trained_again(
        ray_cluster, demo_root, notes_site, tmp_path):
    run_dir = tmp_path / "run"
    config = tiny_config(demo_root, notes_site, run_dir, rounds=24, **ASYNC,
                         **{"merge.max_staleness": 2})
    slow_first = misbehaving.paced_worker(site="notes", seconds=8, first_only=True)
    run_training(config, worker_cls=slow_first)

    manifests = all_manifests(run_dir, include_rejected=True)
    refused = [m["rejected"]["notes"] for m in manifests if "notes" in m["rejected"]]
    assert refused and "over merge.max_staleness=2" in refused[0]
    notes = [e for _, e in lineage_entries(run_dir) if e["site"] == "notes"]
    assert notes and all(e["staleness"] <= 2 for e in notes)
    # The refused update's rows (the site's first) were trained again by a later update.
    first = notes[0]["rows"][0]
    assert (first["start_row"], first.get("start_token", 0)) == (0, 0)
    assert_tiny_rows_exactly_once(run_dir)


@pytest.mark.parametrize("setup", [
    {"merge.strategy": "momentum", "merge.compression": "int8", "merge.reducers": 2,
     "sites.speeches.num_workers": 2, "worker.num_cpus": 0.5},
    {"merge.strategy": "median", "merge.buffer": 2, "merge.compression": "bf16",
     "model.lora": {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}},
], ids=["momentum-int8-reducers-2rank", "median-buffer2-bf16-lora"])
def test_strategies_compression_reducers_and_lora_merge_asynchronously(
        ray_cluster, demo_root, notes_site, tmp_path, setup):
    run_dir = tmp_path / "run"
    config = tiny_config(demo_root, notes_site, run_dir, rounds=4,
                         **{**ASYNC, "merge.max_staleness": 50, **setup})
    run_training(config)

    manifests = all_manifests(run_dir)
    assert [m["version"] for m in manifests] == list(range(5))
    assert [len(m["lineage"]) for m in manifests[1:]] == [config.merge.buffer] * 4
    assert all(e["discount"] == pytest.approx((1 + e["staleness"]) ** -0.5)
               for m in manifests for e in m["lineage"])
    assert_tiny_rows_exactly_once(run_dir)
