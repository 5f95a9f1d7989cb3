"""The quality gate: a candidate version that makes a protected eval set regress is kept
aside as rejected, and the run continues from the last accepted version."""

from __future__ import annotations

import dataclasses

import pytest
import ray.cloudpickle
import torch
from safetensors.torch import load_file

from tests.chaos import misbehaving
from tests.helpers import assert_rows_exactly_once, tiny_config
from trainer.checkpoint import all_manifests
from trainer.coordinator import RunError, run_training
from trainer.metrics import read_metrics

pytestmark = pytest.mark.integration
ray.cloudpickle.register_pickle_by_value(misbehaving)


def test_regressing_candidate_is_rejected_and_the_run_continues(
        ray_cluster, demo_root, notes_site, tmp_path):
    run_dir = tmp_path / "run"
    config = tiny_config(demo_root, notes_site, run_dir, rounds=3)
    protected = [dataclasses.replace(e, protected=e.name == "shakespeare") for e in config.eval]
    config = dataclasses.replace(config, eval=protected)
    run_training(config, worker_cls=misbehaving.noisy_worker(round_index=2, scale=0.5))

    versions = run_dir / "versions"
    assert sorted(p.name for p in versions.iterdir()) == [
        "latest", "rejected", "v0000", "v0001", "v0003"]
    assert (versions / "latest").resolve().name == "v0003"
    manifests = {m["name"]: m for m in all_manifests(run_dir, include_rejected=True)}
    rejected = manifests["v0002"]
    assert rejected["status"] == "rejected" and rejected["parent"] == "v0001"
    assert rejected["gate"][0].startswith("shakespeare: perplexity")
    assert manifests["v0003"]["parent"] == "v0001"  # round 3 built on the last accepted one
    before = load_file(str(versions / "v0001" / "model.safetensors"))
    bad = load_file(str(versions / "rejected" / "v0002" / "model.safetensors"))
    after = load_file(str(versions / "v0003" / "model.safetensors"))
    far = max((bad[k] - before[k]).abs().max().item() for k in before)
    near = max((after[k] - before[k]).abs().max().item() for k in before)
    assert near < far / 10, "round 3 did not start from v0001"
    assert all(torch.isfinite(t).all() for t in after.values())
    records = read_metrics(run_dir)
    assert [r.get("status") for r in records] == ["accepted", "accepted", "rejected", "accepted"]
    # A first rejection steers and retries: its rows are not consumed but trained again in
    # round 3, with more replay and half the peak learning rate.
    assert rejected["increments"] == {} and rejected["retried"]["notes"]
    def start(r: dict) -> tuple:
        return r["file"], r["start_row"], r.get("start_token")

    assert (start(manifests["v0003"]["increments"]["notes"][0])
            == start(rejected["retried"]["notes"][0]))  # the same rows, from the same place
    assert rejected["control"]["retry"] and rejected["control"]["lr_scale"] == 0.5
    assert max(records[3]["lr"]["notes"]) <= 0.5e-3 < max(records[1]["lr"]["notes"])
    assert records[3]["replay_ratio"] > records[1]["replay_ratio"]
    assert manifests["v0003"]["control"]["lr_scale"] == 1.0  # accepted: the lr recovers
    assert_rows_exactly_once(run_dir, "notes", text_column="body")  # retried rows count once


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_gate_that_keeps_rejecting_stops_the_run_with_a_resume_hint(
        ray_cluster, demo_root, notes_site, tmp_path, mode):
    run_dir = tmp_path / "run"
    config = tiny_config(demo_root, notes_site, run_dir, rounds=6,
                         **{"quality.max_rejections": 2, "merge.mode": mode,
                            "merge.buffer": 2})
    protected = [dataclasses.replace(e, protected=e.name == "shakespeare") for e in config.eval]
    config = dataclasses.replace(config, eval=protected)
    worker = misbehaving.noisy_worker(round_index=None, scale=0.5)  # every round is harmful
    with pytest.raises(RunError, match="rejected 2 candidates in a row") as caught:
        run_training(config, worker_cls=worker)
    assert "tributary resume" in str(caught.value) and "v0000" in str(caught.value)
    manifests = all_manifests(run_dir, include_rejected=True)
    assert [m["status"] for m in manifests] == ["accepted", "rejected", "rejected"]
    if mode == "sync":  # the first rejection's rows were retried; the retry's set aside
        assert manifests[1]["increments"] == {} and manifests[2]["increments"]
    assert_rows_exactly_once(run_dir, "notes", text_column="body")
