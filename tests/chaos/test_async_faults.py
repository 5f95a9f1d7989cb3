"""Chaos in merge.mode async: a worker killed inside a task does not hold the other site
back and its rows are trained again; a coordinator SIGKILLed between writing a version and
moving `latest` leaves a run that `resume` continues with every row trained exactly once.
Real Ray, real DeepSpeed on CPU, the tiny model on real text."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import ray
import ray.cloudpickle

from cluster.connect import NAMESPACE
from tests.chaos import misbehaving
from tests.chaos.test_faults import run_in_thread, waiting_to_be_killed
from tests.helpers import REPO_ROOT, assert_tiny_rows_exactly_once, tiny_config
from trainer.checkpoint import all_manifests
from trainer.config import dump_config
from trainer.coordinator import run_training

pytestmark = pytest.mark.integration
ray.cloudpickle.register_pickle_by_value(misbehaving)

ASYNC = {"merge.mode": "async", "merge.buffer": 1, "merge.max_staleness": 50}

KILL_SCRIPT = """
import sys, yaml
from trainer.config import config_from_dict
from trainer.coordinator import run_training
run_training(config_from_dict(yaml.safe_load(open(sys.argv[1]))))
"""


def published(run_dir: Path) -> int:
    return len(list((run_dir / "versions").glob("v[0-9]*")))


def wait_for(condition, *, seconds: float, alive) -> bool:
    deadline = time.monotonic() + seconds
    while alive() and not condition() and time.monotonic() < deadline:
        time.sleep(0.1)
    return condition()


def test_a_killed_worker_does_not_hold_back_the_other_site(
        ray_cluster, demo_root, notes_site, tmp_path):
    run_dir, markers = tmp_path / "run", tmp_path / "in-train-round"
    markers.mkdir()
    config = tiny_config(demo_root, notes_site, run_dir, rounds=10, **ASYNC)
    worker = waiting_to_be_killed(site="notes", rounds=(2,), folder=markers)
    thread, raised = run_in_thread(run_training, config, worker_cls=worker)
    marker = markers / "2"
    assert wait_for(marker.exists, seconds=300, alive=thread.is_alive), \
        "the notes worker never began its second task"
    before = published(run_dir)
    # While notes waits inside its task, the speeches site goes on publishing versions.
    assert wait_for(lambda: published(run_dir) >= before + 2, seconds=120,
                    alive=thread.is_alive), "the fast site waited for the stuck one"
    actor = ray.get_actor("tributary-worker-notes", namespace=NAMESPACE)
    assert actor._actor_id.hex() == marker.read_text()
    ray.kill(actor)
    thread.join()
    if raised:
        raise raised[0]
    manifests = all_manifests(run_dir, include_rejected=True)
    failed = [m["version"] for m in manifests if "notes" in m["failures"]]
    assert len(failed) == 1, f"one failure of notes expected, manifests say {failed}"
    later = [e for m in manifests if m["version"] > failed[0] for e in m["lineage"]
             if e["site"] == "notes"]
    assert later, "the restarted notes worker never trained again"
    assert_tiny_rows_exactly_once(run_dir)


def test_coordinator_sigkill_then_resume_trains_every_row_once(
        ray_cluster, demo_root, notes_site, tmp_path):
    run_dir = tmp_path / "run"
    config = tiny_config(demo_root, notes_site, run_dir, rounds=8, **ASYNC,
                         **{"run.eval_every": 2})
    config_path = tmp_path / "config.yaml"
    dump_config(config, config_path)
    # v0003 is written and renamed into place, but has no weights (eval_every 2) and
    # `latest` still names v0002: resume goes on from v0002 and sets v0003 aside.
    env = dict(os.environ, RAY_ADDRESS=ray.get_runtime_context().gcs_address,
               TRIBUTARY_KILL_AT="renamed:3")
    child = subprocess.run([sys.executable, "-c", KILL_SCRIPT, str(config_path)], env=env,
                           cwd=REPO_ROOT, capture_output=True, text=True, timeout=600,
                           check=False)
    assert child.returncode == -9, child.stderr[-3000:]
    assert (run_dir / "versions" / "v0003").is_dir()
    assert (run_dir / "versions" / "latest").resolve().name == "v0002"

    run_training(config, resume=True)

    versions = run_dir / "versions"
    assert (versions / "superseded" / "v0003").is_dir()
    assert sorted(p.name for p in versions.glob("v[0-9]*")) == [f"v{i:04d}" for i in range(9)]
    assert (versions / "latest").resolve().name == "v0008"
    assert [m["version"] for m in all_manifests(run_dir)] == list(range(9))
    assert_tiny_rows_exactly_once(run_dir)


def test_every_update_that_finished_during_a_long_merge_is_taken(
        ray_cluster, demo_root, notes_site, tmp_path, monkeypatch):
    """The coordinator is busy (paused) well past merge.round_timeout_s just after giving
    both sites a task; both finish meanwhile. Both are merged: neither is failed for a
    deadline that passed while nobody was looking."""
    run_dir = tmp_path / "run"
    monkeypatch.setenv("TRIBUTARY_PAUSE_AT", "launched:0:75")
    config = tiny_config(demo_root, notes_site, run_dir, rounds=1,
                         **{**ASYNC, "merge.round_timeout_s": 40})
    run_training(config)
    first = all_manifests(run_dir)[1]
    assert first["failures"] == {}, first["failures"]
    assert sorted(first["increments"]) == ["notes", "speeches"]
