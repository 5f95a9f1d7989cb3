"""Bit-identical resume beyond the plain configuration: the coordinator is SIGKILLed and
`tributary resume` must end with exactly the weights, rejected candidates and lineage of a run
that never stopped — with dropout drawing random masks, int8 deltas carrying error feedback,
an int8 downlink (its own error feedback, and a rejected candidate's change taken back),
site-local replay, sharded reducers, a 2-worker DeepSpeed site and a round the quality gate
rejects (one run), and with LoRA adapters (another). The kills land between a version's rename
and the move of `latest`, and right after a merge; a torn metrics line is left behind too."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import ray
import ray.cloudpickle
import torch
from safetensors.torch import load_file

from tests.chaos import misbehaving
from tests.helpers import ARCH, REPO_ROOT, assert_rows_exactly_once, tiny_config, zero_config
from trainer.checkpoint import all_manifests
from trainer.config import dump_config
from trainer.coordinator import run_training
from trainer.metrics import read_metrics

pytestmark = pytest.mark.integration
ray.cloudpickle.register_pickle_by_value(misbehaving)

EVERYTHING = {  # all on at once: a state any of them forgot would break identity
    "rounds": 3,
    "model.architecture": {**ARCH, "attention_dropout": 0.2},
    "merge.compression": "int8", "merge.reducers": 2, "merge.downlink": "int8",
    "replay.scope": "site",
    "sites.speeches.num_workers": 2, "worker.num_cpus": 0.5,
    "eval[0].protected": True, "quality.max_regression": 0.02,
}
LORA = {"rounds": 2, "model.lora": {"r": 4, "alpha": 8, "dropout": 0.2,
                                    "target_modules": ["q_proj", "v_proj"]},
        "merge.compression": "int8"}
NOISY_ROUND = 2  # the noise makes the gate reject round 2's candidate

# argv: the config, and the misbehaving worker as JSON [factory name, its keyword arguments].
KILL_SCRIPT = """
import json, sys, yaml, ray.cloudpickle
from tests.chaos import misbehaving
from trainer.config import config_from_dict
from trainer.coordinator import run_training
ray.cloudpickle.register_pickle_by_value(misbehaving)
config = config_from_dict(yaml.safe_load(open(sys.argv[1])))
factory, kwargs = json.loads(sys.argv[2])
run_training(config, worker_cls=getattr(misbehaving, factory)(**kwargs))
"""


def files_of(run_dir: Path, version: str, *, rejected: bool = False) -> dict:
    folder = run_dir / "versions" / ("rejected" if rejected else "") / version
    return {p.name: load_file(str(p)) for p in sorted(folder.glob("*.safetensors"))}


def identical(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
        for x, y in zip(a.values(), b.values(), strict=True))


def kill_and_resume(config, run_dir: Path, tmp_path: Path, *, point: str, noisy: int | None = None,
                    worker: tuple[str, dict] | None = None) -> str:
    """Run `config` in a child process that SIGKILLs itself at `point`, then resume here.
    The sites run `misbehaving.noisy_worker` in round `noisy`, or `worker` (a factory of
    `misbehaving` and its arguments). Returns the child's log (stderr)."""
    config_path = tmp_path / "config.yaml"
    dump_config(config, config_path)
    worker = worker or ("noisy_worker", {"round_index": noisy, "scale": 0.5})
    env = dict(os.environ, RAY_ADDRESS=ray.get_runtime_context().gcs_address,
               TRIBUTARY_KILL_AT=point)
    child = subprocess.run([sys.executable, "-c", KILL_SCRIPT, str(config_path),
                            json.dumps(worker)],
                           env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600,
                           check=False)
    assert child.returncode == -9, child.stderr[-3000:]
    with open(run_dir / "metrics.jsonl", "a") as handle:  # a kill in the middle of a line
        handle.write('{"round": 99, "eval_perplexity": {"shakes')
    factory, kwargs = worker
    run_training(config, resume=True, worker_cls=getattr(misbehaving, factory)(**kwargs))
    return child.stderr


def test_everything_on_resumes_bit_identically_after_a_kill_before_latest_moves(
        ray_cluster, demo_root, notes_site, tmp_path):
    worker = misbehaving.noisy_worker(round_index=NOISY_ROUND, scale=0.5)
    straight = tmp_path / "straight"
    run_training(tiny_config(demo_root, notes_site, straight, **EVERYTHING), worker_cls=worker)
    manifests = {m["name"]: m for m in all_manifests(straight, include_rejected=True)}
    assert manifests["v0002"]["status"] == "rejected"  # the gate's rollback is part of it

    killed = tmp_path / "killed"
    config = tiny_config(demo_root, notes_site, killed, **EVERYTHING)
    kill_and_resume(config, killed, tmp_path, point="renamed:3", noisy=NOISY_ROUND)

    for version in ("v0001", "v0003"):
        assert identical(files_of(straight, version), files_of(killed, version)), version
    assert identical(files_of(straight, "v0002", rejected=True),
                     files_of(killed, "v0002", rejected=True))
    a, b = all_manifests(straight, include_rejected=True), all_manifests(killed,
                                                                         include_rejected=True)
    for key in ("increments", "cursors", "tokens", "merge_weights", "status", "skipped"):
        assert [m[key] for m in a] == [m[key] for m in b], key
    assert [r["round"] for r in read_metrics(killed)] == [0, 1, 2, 3]
    assert_rows_exactly_once(killed, "notes", text_column="body")


def test_lora_resumes_bit_identically_after_a_kill_after_the_merge(
        ray_cluster, demo_root, notes_site, tmp_path):
    straight = tmp_path / "straight"
    run_training(tiny_config(demo_root, notes_site, straight, **LORA))
    killed = tmp_path / "killed"
    config = tiny_config(demo_root, notes_site, killed, **LORA)
    kill_and_resume(config, killed, tmp_path, point="merged:2", noisy=0)
    assert identical(files_of(straight, "v0002"), files_of(killed, "v0002"))
    assert all_manifests(straight)[-1]["cursors"] == all_manifests(killed)[-1]["cursors"]


BUDGET = {"rounds": 3, "replay.target_forgetting": 0.0, "quality.confidence": 0.5,
          "eval[0].covers": {"site": "notes"}, "eval[1].covers": {"site": "speeches"}}


def test_the_forgetting_budget_steers_replay_and_resumes_bit_identically(
        ray_cluster, demo_root, notes_site, tmp_path):
    """Round 2's noise makes every set forget: the budget (here 0, acting on any change)
    raises the replay ratio and the weights of the strata those sets cover; round 3 trains
    with them; a kill after round 3's merge resumes to the same weights and decisions."""
    straight = tmp_path / "straight"
    worker = misbehaving.noisy_worker(round_index=NOISY_ROUND, scale=0.5)
    run_training(tiny_config(demo_root, notes_site, straight, **BUDGET), worker_cls=worker)
    manifests = all_manifests(straight)
    control = manifests[2]["control"]
    actions = {d["set"]: d["action"] for d in control["decisions"]}
    assert actions == {"shakespeare": "raise", "code": "raise"}
    assert control["ratio_scale"] > 1 and control["weights"]
    assert all(k.startswith(("notes/", "speeches/")) for k in control["weights"])
    records = read_metrics(straight)
    assert records[3]["replay_ratio"] == min(0.25 * control["ratio_scale"], 0.5)  # round 3

    killed = tmp_path / "killed"
    kill_and_resume(tiny_config(demo_root, notes_site, killed, **BUDGET), killed, tmp_path,
                    point="merged:3", noisy=NOISY_ROUND)
    assert identical(files_of(straight, "v0003"), files_of(killed, "v0003"))
    assert [m["control"] for m in all_manifests(straight)] == [
        m["control"] for m in all_manifests(killed)]


ZERO3 = {"rounds": 3, "worker.prox_mu": 0, "merge.min_workers": 2,  # a failed site: retried
         "merge.compression": "int8", "merge.reducers": 2,
         "sites.speeches.num_workers": 2, "worker.num_cpus": 0.5}


def test_a_zero3_site_resumes_bit_identically_after_a_rank_and_the_coordinator_are_killed(
        ray_cluster, demo_root, notes_site, tmp_path):
    """Both sites at ZeRO-3, speeches on two ranks, each holding half of every weight and of
    the optimizer's moments, and sending the int8 delta of its half to the sharded reducers.
    Rank 1 dies as round 2 starts: the round is retried with the site restarted from each
    rank's committed state; the coordinator dies after round 3's merge; resumed, every
    version equals a run in which nothing died."""
    ds = json.dumps(zero_config(3))
    straight = tmp_path / "straight"
    run_training(tiny_config(demo_root, notes_site, straight, **ZERO3,
                             **{"worker.deepspeed": ds}))
    killed = tmp_path / "killed"
    config = tiny_config(demo_root, notes_site, killed, **ZERO3, **{"worker.deepspeed": ds})
    worker = ("rank_killing_worker", {"site": "speeches", "rank": 1, "round_index": 2,
                                      "folder": str(tmp_path)})
    log = kill_and_resume(config, killed, tmp_path, point="merged:3", worker=worker)

    assert (tmp_path / "killed-speeches-rank1").is_file(), "rank 1 was never killed"
    assert "round 2 got 1 valid update(s)" in log and "retrying it" in log, log[-3000:]
    for version in ("v0001", "v0002", "v0003"):
        assert identical(files_of(straight, version), files_of(killed, version)), version
    assert all_manifests(straight)[-1]["cursors"] == all_manifests(killed)[-1]["cursors"]
