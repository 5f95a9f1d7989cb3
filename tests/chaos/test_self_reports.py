"""Chaos: a site claims far more tokens than it trained, to dominate the weighted merge. The
coordinator holds every self-report to the round it planned for the site and refuses the
update, with the reason in the manifest; the rows are trained again later."""

from __future__ import annotations

import pytest
import ray.cloudpickle

from tests.chaos import misbehaving
from tests.helpers import assert_rows_exactly_once, tiny_config
from trainer.checkpoint import all_manifests
from trainer.coordinator import run_training

pytestmark = pytest.mark.integration
ray.cloudpickle.register_pickle_by_value(misbehaving)


def test_a_site_claiming_more_tokens_than_planned_is_refused(ray_cluster, demo_root,
                                                            notes_site, tmp_path):
    run_dir = tmp_path / "run"
    worker = misbehaving.boasting_worker(site="notes", round_index=2, factor=50)
    run_training(tiny_config(demo_root, notes_site, run_dir, rounds=3), worker_cls=worker)
    manifests = all_manifests(run_dir)
    reason = manifests[2]["rejected"]["notes"]
    assert "planned for at most 576" in reason  # 3 steps × 3 new sequences × 64 tokens
    assert set(manifests[2]["merge_weights"]) == {"speeches"}
    assert "notes" in manifests[3]["increments"]  # its rows, trained again in round 3
    assert_rows_exactly_once(run_dir, "notes", text_column="body")
