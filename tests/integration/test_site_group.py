"""sites[].num_workers: a site served by two Worker actors forming one DeepSpeed data-parallel
group (gloo on CPU) trains like one worker on the same data."""

from __future__ import annotations

import pytest
import ray
from safetensors.torch import load_file

from tests.helpers import tiny_config
from trainer.checkpoint import all_manifests
from trainer.coordinator import run_training
from trainer.metrics import read_metrics

pytestmark = pytest.mark.integration


def test_two_worker_site_matches_a_single_worker(two_rounds, ray_cluster, demo_root, notes_site,
                                                 tmp_path):
    run_dir = tmp_path / "group"
    # Three actors on the 2-CPU test cluster: half a CPU each.
    config = tiny_config(demo_root, notes_site, run_dir,
                         **{"sites.speeches.num_workers": 2, "worker.num_cpus": 0.5})
    run_training(config)

    baseline = two_rounds[0]
    expected = load_file(str(baseline / "versions" / "v0002" / "model.safetensors"))
    grouped = load_file(str(run_dir / "versions" / "v0002" / "model.safetensors"))
    worst = max(float((expected[k] - grouped[k]).abs().max()) for k in expected)
    # Measured 2.3e-6 (summation order across ranks); a per-rank mean loss instead of the
    # whole batch's token count gives 2.9e-3 and fails here.
    assert worst < 1e-5, f"group and single worker differ by up to {worst:.3g}"
    # One update per site and round, the same rows and tokens as the single worker's.
    a, b = all_manifests(baseline), all_manifests(run_dir)
    assert [m["increments"] for m in a] == [m["increments"] for m in b]
    assert [m["tokens"] for m in a] == [m["tokens"] for m in b]
    assert all(r["workers_ok"] == 2 for r in read_metrics(run_dir)[1:])
    # Each rank kept its own optimizer state.
    sites = run_dir / "sites" / "speeches"
    assert (sites / "state" / "round-0002").is_dir()
    assert (sites / "state-rank1" / "round-0002").is_dir()
    assert not [a for a in ray.util.list_named_actors(all_namespaces=True)
                if a["name"].startswith("tributary-worker-speeches")]
