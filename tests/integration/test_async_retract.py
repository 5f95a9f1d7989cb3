"""Retraction and lineage of merge.mode async runs.

Retracting a file from an async run gives the weights of a fresh async run that never had it,
where both see the same order of arrivals: here one site with merge.buffer 2, whose tasks
arrive in one order only. The restart point is the newest version before the data's first
touch that was written whole (with run.eval_every 2 every other version is a manifest only),
and the site's state is found by its own count of tasks (`sequence`), not the global round.
A gate rejection takes the site's optimizer state back with the model, so no later version
is influenced by a refused update through it."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import ray.cloudpickle
from safetensors.torch import load_file

from tests.chaos import misbehaving
from tests.helpers import assert_rows_exactly_once, tiny_config
from tests.integration.test_retract import assert_same_weights, copy_of
from trainer.checkpoint import all_manifests
from trainer.config import load_config
from trainer.coordinator import run_training
from trainer.lineage import Query, lineage
from trainer.retract import carry_out, plan
from workers.worker import Worker

pytestmark = pytest.mark.integration
ray.cloudpickle.register_pickle_by_value(misbehaving)

# Small tasks (about 2 rows each) so the 24 rows make several versions of 2 tasks each.
ASYNC = {"merge.mode": "async", "merge.buffer": 2, "run.eval_every": 2,
         "worker.local_steps": 2, "rounds": 12}


def notes_only(config):
    return dataclasses.replace(config, sites=[s for s in config.sites if s.name == "notes"])


def split_site(source, target, *, files: int, skip: str | None = None):
    """The notes site's 24 rows in `files` files of equal size (all but `skip`)."""
    rows = [line for path in sorted(source.glob("part-*.jsonl"))
            for line in path.read_text().splitlines(keepends=True)]
    target.mkdir(parents=True)
    size = len(rows) // files
    for index in range(files):
        if f"part-{index}.jsonl" != skip:
            (target / f"part-{index}.jsonl").write_text(
                "".join(rows[index * size:(index + 1) * size]))
    return target


def first_touches(run_dir) -> dict[str, int]:
    """Each file's first version."""
    first = {}
    for manifest in all_manifests(run_dir, include_rejected=True):
        for entry in manifest["increments"].get("notes", []):
            first.setdefault(entry["file"], manifest["version"])
    return first


@pytest.fixture(scope="module")
def runs(ray_cluster, demo_root, notes_site, tmp_path_factory):
    """An async run of a site of 6 files, the file to retract, and a fresh async run whose
    site never had that file."""
    root = tmp_path_factory.mktemp("async-retract")
    site = split_site(notes_site, root / "site", files=6)
    original = root / "original" / "run"
    run_training(notes_only(tiny_config(demo_root, site, original, **ASYNC,
                                        **{"sites.notes.path": str(site)})))
    # A file first read by a version whose predecessor has no weights (eval_every 2), past
    # the first two: the restart steps back to a version written whole, and is not v0.
    part = min(f for f, v in first_touches(original).items() if v % 2 == 0 and v >= 4)
    without = split_site(notes_site, root / "without", files=6, skip=Path(part).name)
    fresh = root / "fresh" / "run"
    run_training(notes_only(tiny_config(demo_root, without, fresh, **ASYNC,
                                        **{"sites.notes.path": str(without)})))
    return {"root": root, "original": original, "fresh": fresh, "part": part}


def test_retracting_a_file_of_an_async_run_equals_a_fresh_async_run_without_it(runs):
    run_dir = copy_of(runs, "file")
    part = runs["part"]
    manifests = {m["version"]: m for m in all_manifests(run_dir, include_rejected=True)}
    first = first_touches(run_dir)[part]
    assert not manifests[first - 1]["weights_sha256"]  # the step back is needed
    assert manifests[first - 2]["sequence"]["notes"] != manifests[first - 2]["round"]

    config = load_config(run_dir / "config.yaml", check_files=False)
    planned = plan(run_dir, config, file=part, site=None, reason="test")
    assert planned.missing == []
    assert planned.record.restart_from == f"v{first - 2:04d}"
    carry_out(run_dir, planned.record, run=run_training)

    assert_same_weights(run_dir, runs["fresh"])
    new_line = all_manifests(run_dir, include_rejected=True)
    assert [m["sequence"] for m in new_line] == [m["sequence"] for m in
                                                 all_manifests(runs["fresh"],
                                                               include_rejected=True)]
    assert not any(e["file"] == part for m in new_line for e in m["increments"].get("notes", []))


def test_an_async_retraction_that_cannot_restart_is_refused_with_the_reason(runs):
    run_dir = copy_of(runs, "refused")
    part = runs["part"]
    config = load_config(run_dir / "config.yaml", check_files=False)
    restart = plan(run_dir, config, file=part, site=None, reason="test").record.restart_from
    sequence = json.loads((run_dir / "versions" / restart / "manifest.json").read_text())[
        "sequence"]["notes"]
    shutil.rmtree(run_dir / "sites" / "notes" / "state" / f"round-{sequence:04d}")
    for weights in (run_dir / "versions" / restart).glob("*.safetensors"):
        weights.unlink()

    missing = plan(run_dir, config, file=part, site=None, reason="test").missing
    assert missing == [f"the weights of {restart} are pruned (run.keep_versions)",
                       (f"site notes's state of task {sequence} is gone "
                        f"(sites/notes/state*/round-{sequence:04d})")]


def once_noisy_worker(*, task: int) -> type:
    """A Worker whose delta is noise the first time it trains task `task` (not when that
    task number comes round again after the rejection)."""

    class OnceNoisy(misbehaving.noisy_worker(round_index=task, scale=0.5)):
        noised = False

        def train_round(self, task_, weights, base=None):
            if task_.round_index == task and self.noised:
                return Worker.train_round(self, task_, weights, base)
            self.noised |= task_.round_index == task
            return super().train_round(task_, weights, base)

    return OnceNoisy


def adam_step(state_folder) -> float:
    """The optimizer's step count saved in a site's committed state."""
    meta = json.loads((state_folder / "optimizer.json").read_text())
    steps = [v for k, v in meta["scalars"].items() if k.endswith(".step")]
    if not steps:
        tensors = load_file(str(state_folder / "optimizer.safetensors"))
        steps = [t.item() for k, t in tensors.items() if k.endswith(".step")]
    return max(steps)


def test_an_async_rejection_takes_the_sites_state_back_with_the_model(
        ray_cluster, demo_root, notes_site, tmp_path):
    run_dir = tmp_path / "run"
    config = notes_only(tiny_config(demo_root, notes_site, run_dir, rounds=4,
                                    **{"merge.mode": "async", "merge.buffer": 1}))
    config = dataclasses.replace(config, eval=[dataclasses.replace(
        e, protected=e.name == "shakespeare") for e in config.eval])
    run_training(config, worker_cls=once_noisy_worker(task=2))

    manifests = all_manifests(run_dir, include_rejected=True)
    assert [m["status"] for m in manifests] == ["accepted", "accepted", "rejected",
                                               "accepted", "accepted"]
    before, rejected, after = manifests[1], manifests[2], manifests[3]
    # Its rows stay consumed by the rejected version; the site went back to its first task.
    assert rejected["increments"]["notes"] and rejected["sequence"] == {"notes": 1}
    assert after["sequence"] == {"notes": 2} and after["parent"] == before["name"]
    states = run_dir / "sites" / "notes" / "state"
    steps = config.worker.local_steps
    # Task 2 after the rejection trained from task 1's optimizer state, not the noisy one's.
    assert adam_step(states / "round-0002") - adam_step(states / "round-0001") == steps
    # So the later versions owe nothing to the refused update: the lineage of its rows is
    # the rejected version alone.
    entry = rejected["increments"]["notes"][0]
    others = [e for m in manifests if m is not rejected for e in m["increments"].get("notes", [])
              if e["file"] == entry["file"]]
    only = next(r for r in range(entry["start_row"], entry["end_row"])
                if not any(e["start_row"] <= r < e["end_row"] for e in others))
    touches = lineage(run_dir, Query(file=entry["file"], rows=(only, only + 1)))
    assert [t.version for t in touches] == [rejected["name"]]
    assert_rows_exactly_once(run_dir, "notes", text_column="body")
