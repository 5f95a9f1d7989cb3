"""No silent waits: a site whose workers the cluster cannot place is reported within seconds,
with what it asks for and what the cluster has, and the run goes on without it (or stops, as
merge.min_workers says) instead of waiting for the round deadline."""

from __future__ import annotations

import shutil
import time

import pytest

from tests.helpers import EnvironProbe, tiny_config
from trainer.checkpoint import all_manifests
from trainer.coordinator import RunError, run_training

pytestmark = pytest.mark.integration


def placement_config(demo_root, notes_site, tmp_path, **overrides):
    """Three sites on the 2-CPU test cluster, 1.5 CPUs a worker: `speeches` is placed, `notes`
    waits for a CPU that never frees, `pinned` asks for a resource no node has."""
    pinned = tmp_path / "pinned"
    shutil.copytree(notes_site, pinned)
    config = tiny_config(demo_root, notes_site, tmp_path / "run", rounds=1, **{
        "worker.num_cpus": 1.5, "cluster.placement_timeout_s": 5,
        "merge.round_timeout_s": 1800, **overrides})
    raw = config.to_dict()
    raw["sites"].append({**raw["sites"][1], "name": "pinned", "path": str(pinned),
                         "resources": {"nowhere": 1}})
    from trainer.config import config_from_dict

    return config_from_dict(raw)


def test_unplaceable_sites_are_reported_within_seconds_and_left_out(
        ray_cluster, demo_root, notes_site, tmp_path, caplog):
    config = placement_config(demo_root, notes_site, tmp_path)
    started = time.monotonic()
    run_training(config)
    assert time.monotonic() - started < 120  # not merge.round_timeout_s (30 minutes)
    last = all_manifests(tmp_path / "run")[-1]
    assert last["round"] == 1 and list(last["increments"]) == ["speeches"]
    assert last["down"] == ["notes", "pinned"]
    reasons = last["down_reasons"]
    assert "asks for {'CPU': 1.5, 'nowhere': 1.0}" in reasons["pinned"]
    assert "no node has that" in reasons["pinned"]
    assert "not placed within cluster.placement_timeout_s=5 s" in reasons["notes"]
    assert "each asks for {'CPU': 1.5}" in reasons["notes"] and "free of" in reasons["notes"]
    assert any("site notes cannot be placed" in r.message for r in caplog.records)


def test_too_few_placeable_sites_for_the_quorum_stop_the_run(ray_cluster, demo_root,
                                                             notes_site, tmp_path):
    config = placement_config(demo_root, notes_site, tmp_path, **{"merge.min_workers": 2})
    started = time.monotonic()
    with pytest.raises(RunError, match=r"only 1 site\(s\) can run, merge.min_workers=2"):
        run_training(config)
    assert time.monotonic() - started < 120


@pytest.mark.parametrize("threshold", [65536, None])
def test_worker_processes_start_with_the_configured_malloc_threshold(ray_cluster, threshold):
    from trainer.sites import start_site

    workers = start_site(worker_cls=EnvironProbe, site=f"probe{threshold}", size=2,
                         num_cpus=0.5, num_gpus=0, resources={}, make_kwargs=lambda _: {},
                         malloc_mmap_threshold=threshold)
    try:
        import ray

        environs = ray.get([actor.start_environ.remote() for actor in workers.actors])
    finally:
        workers.kill()
    assert len(environs) == 2
    for environ in environs:
        assert environ.get("MALLOC_MMAP_THRESHOLD_") == (
            None if threshold is None else str(threshold))
        assert environ["DS_ACCELERATOR"] == "cpu"
