"""Chaos: workers killed mid-run, the coordinator SIGKILLed at several points, poisoned updates.
Real Ray, real DeepSpeed on CPU, the tiny model on real text."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import ray
import ray.cloudpickle
import torch
from safetensors.torch import load_file

from cluster.connect import NAMESPACE
from tests.chaos import misbehaving
from tests.helpers import assert_rows_exactly_once, assert_tiny_rows_exactly_once, tiny_config
from trainer.checkpoint import all_manifests
from trainer.config import dump_config
from trainer.coordinator import run_training
from trainer.metrics import read_metrics
from workers.worker import Worker

pytestmark = pytest.mark.integration
ray.cloudpickle.register_pickle_by_value(misbehaving)


def weights(run_dir: Path, version: str) -> dict:
    return load_file(str(run_dir / "versions" / version / "model.safetensors"))


@pytest.fixture
def baseline(two_rounds) -> Path:
    """The uninterrupted 2-round run (shared with the integration suite)."""
    return two_rounds[0]


def waiting_to_be_killed(*, site: str, rounds: tuple[int, ...], folder: Path) -> type:
    """A Worker class whose `site`, in each of `rounds`, writes `folder/<round>` holding its
    actor id on entering train_round and then waits (up to a minute) for the test to kill it:
    so the kill lands inside that round's training, whatever the machine's speed. A round
    already marked is trained plainly (async mode gives a restarted worker the same task)."""

    class WaitingWorker(Worker):
        def train_round(self, task, weights, base=None):
            round_index = task.round_index
            marker = folder / str(round_index)
            if self.site.name == site and round_index in rounds and not marker.exists():
                import time

                import ray
                marker.with_suffix(".tmp").write_text(ray.get_runtime_context().get_actor_id())
                marker.with_suffix(".tmp").rename(marker)
                time.sleep(60)  # the test kills this actor here
            return super().train_round(task, weights, base)

    return WaitingWorker


def run_in_thread(target, *args, **kwargs) -> tuple[threading.Thread, list[BaseException]]:
    """Start `target(*args, **kwargs)` in a thread; the list receives what it raised, for
    re-raising in the test."""
    raised: list[BaseException] = []

    def body():
        try:
            target(*args, **kwargs)
        except BaseException as exc:  # noqa: BLE001 - handed to the test thread
            raised.append(exc)

    thread = threading.Thread(target=body)
    thread.start()
    return thread, raised


def test_killed_workers_restart_and_every_row_is_trained_once(
        ray_cluster, demo_root, notes_site, tmp_path):
    run_dir, markers = tmp_path / "run", tmp_path / "in-train-round"
    markers.mkdir()
    config = tiny_config(demo_root, notes_site, run_dir, rounds=4, **{"worker.local_steps": 6})
    worker = waiting_to_be_killed(site="notes", rounds=(2, 3), folder=markers)
    thread, raised = run_in_thread(run_training, config, worker_cls=worker)
    killed = {}
    for target in (2, 3):  # kill the notes worker inside its rounds 2 and 3
        marker = markers / str(target)
        deadline = time.monotonic() + 300
        while thread.is_alive() and not marker.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        if not marker.exists():
            break
        inside = marker.read_text()  # the incarnation now waiting inside train_round
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # not found in 10 s: the name is wrong
            try:
                actor = ray.get_actor("tributary-worker-notes", namespace=NAMESPACE)
            except ValueError:  # the GCS answers a name lookup on its own time: look again
                time.sleep(0.1)
                continue
            assert actor._actor_id.hex() == inside, "the name found another actor than the " \
                "one training the round"
            ray.kill(actor)
            killed[target] = inside
            break
    thread.join()
    if raised:
        raise raised[0]
    assert list(killed) == [2, 3], f"killed the notes worker in rounds {list(killed)}, not 2 and 3"
    manifests = all_manifests(run_dir)
    assert manifests[-1]["round"] == 4
    failed_rounds = [m["round"] for m in manifests if "notes" in m["failures"]]
    assert failed_rounds == [2, 3], "each kill is one failed round of its site"
    assert_tiny_rows_exactly_once(run_dir)
    assert "notes" in manifests[-1]["increments"], "the restarted worker never trained again"


@pytest.mark.parametrize("point", ["training", "merged", "checkpoint"])
def test_coordinator_sigkill_then_resume_equals_uninterrupted(
        point, baseline, ray_cluster, demo_root, notes_site, tmp_path):
    run_dir = tmp_path / "run"
    config_path = tmp_path / "config.yaml"
    dump_config(tiny_config(demo_root, notes_site, run_dir), config_path)
    env = dict(os.environ, RAY_ADDRESS=ray.get_runtime_context().gcs_address,
               TRIBUTARY_KILL_AT=f"{point}:2")
    proc = subprocess.run([sys.executable, "-m", "trainer", "run", str(config_path)], env=env,
                          capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == -9, proc.stderr[-3000:]
    assert (run_dir / "versions" / "latest").resolve().name == "v0001"
    assert not (run_dir / "versions" / "v0002").exists()

    run_training(tiny_config(demo_root, notes_site, run_dir), resume=True)
    expected, resumed = weights(baseline, "v0002"), weights(run_dir, "v0002")
    assert all(torch.equal(expected[k], resumed[k]) for k in expected)
    assert [r["round"] for r in read_metrics(run_dir)] == [0, 1, 2]
    assert all_manifests(run_dir)[-1]["cursors"] == all_manifests(baseline)[-1]["cursors"]


# The NaN case merges sharded: the reducers, not the coordinator, see the poisoned slices.
@pytest.mark.parametrize("kind, options", [("nan", {"merge.reducers": 2}), ("huge", {})])
def test_poisoned_update_is_rejected_and_its_rows_trained_later(
        kind, options, ray_cluster, demo_root, notes_site, tmp_path):
    run_dir = tmp_path / "run"
    worker = misbehaving.poisoned_worker(site="notes", round_index=2, kind=kind)
    run_training(tiny_config(demo_root, notes_site, run_dir, rounds=3, **options),
                 worker_cls=worker)
    manifests = all_manifests(run_dir)
    assert [m["round"] for m in manifests] == [0, 1, 2, 3]
    reason = manifests[2]["rejected"]["notes"]
    assert ("NaN" in reason) if kind == "nan" else ("max_norm_ratio" in reason)
    assert "notes" not in manifests[2]["increments"]
    assert "notes" in manifests[3]["increments"]  # the rejected rows, trained in round 3
    assert_rows_exactly_once(run_dir, "notes", text_column="body")
    for m in manifests:  # no poisoned value ever reached a version
        assert all(torch.isfinite(t).all() for t in weights(run_dir, m["name"]).values())


def test_straggler_past_the_deadline_is_left_out_and_retrained(
        ray_cluster, demo_root, notes_site, tmp_path):
    run_dir = tmp_path / "run"
    worker = misbehaving.slow_worker(site="notes", round_index=2, seconds=120)
    config = tiny_config(demo_root, notes_site, run_dir, rounds=3,
                         **{"merge.round_timeout_s": 15})
    run_training(config, worker_cls=worker)
    manifests = all_manifests(run_dir)
    assert [m["round"] for m in manifests] == [0, 1, 2, 3]
    assert "merge.round_timeout_s=15" in manifests[2]["failures"]["notes"]
    assert "notes" not in manifests[2]["increments"]
    assert "notes" in manifests[3]["increments"]
    assert_rows_exactly_once(run_dir, "notes", text_column="body")


def test_site_that_stays_down_is_reported_and_left_out(
        ray_cluster, demo_root, notes_site, tmp_path):
    run_dir = tmp_path / "run"
    worker = misbehaving.failing_worker(site="notes")
    config = tiny_config(demo_root, notes_site, run_dir, rounds=4,
                         **{"worker.max_missed_rounds": 1})
    run_training(config, worker_cls=worker)
    manifests = all_manifests(run_dir)
    assert [m["round"] for m in manifests] == [0, 1, 2, 3, 4]
    assert [("notes" in m["failures"]) for m in manifests[1:]] == [True, True, False, False]
    assert "is broken" in manifests[1]["failures"]["notes"]
    assert manifests[2]["down"] == ["notes"] and manifests[-1]["down"] == ["notes"]
    assert all("notes" not in m["increments"] for m in manifests)
    assert_rows_exactly_once(run_dir, "speeches", text_column="text")


def test_a_state_that_cannot_be_saved_is_reported_and_the_run_goes_on(
        ray_cluster, demo_root, notes_site, tmp_path, caplog):
    """The coordinator does not wait for workers' commits (each `durable` waits for its own):
    a commit that fails is reported when the version waits for it, the merged update stays
    merged, and the site trains its next round from its previous saved state."""
    run_dir = tmp_path / "run"
    worker = misbehaving.unsaved_worker(site="notes", round_index=2)
    with caplog.at_level(logging.WARNING, logger="trainer.versions"):
        run_training(tiny_config(demo_root, notes_site, run_dir, rounds=3), worker_cls=worker)
    manifests = all_manifests(run_dir)
    assert [m["round"] for m in manifests] == [0, 1, 2, 3]
    assert all("notes" in m["increments"] and not m["failures"] for m in manifests[1:])
    [warning] = [r.getMessage() for r in caplog.records if "was not saved" in r.getMessage()]
    assert "v0002" in warning and "No space left on device" in warning
    saved = sorted(p.name for p in (run_dir / "sites" / "notes" / "state").glob("round-*"))
    assert saved == ["round-0001", "round-0003"]
    assert_rows_exactly_once(run_dir, "notes", text_column="body")
