"""End to end on a real local Ray cluster with real DeepSpeed workers on CPU."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.dataset as ds
import pytest
import ray
import ray.util.state
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.helpers import assert_rows_exactly_once, tiny_config
from tests.ray_fixtures import ASYNC_METRICS, EXPECTED_METRICS, ON_FAILURE_METRICS
from trainer.checkpoint import all_manifests, sha256_file
from trainer.config import load_config
from trainer.coordinator import run_training
from trainer.evaluate import load_eval_set, perplexity
from trainer.metrics import RayMetrics, read_metrics
from trainer.model_source import load_tokenizer
from workers.increments import increment_files

pytestmark = pytest.mark.integration


def test_versions_manifests_and_metrics_are_written(two_rounds):
    run_dir, _ = two_rounds
    names = sorted(p.name for p in (run_dir / "versions").iterdir())
    assert names == ["latest", "v0000", "v0001", "v0002"]
    assert (run_dir / "versions" / "latest").resolve().name == "v0002"
    manifests = all_manifests(run_dir)
    assert [m["parent"] for m in manifests] == [None, "v0000", "v0001"]
    for m in manifests:
        folder = run_dir / "versions" / m["name"]
        digest = sha256_file(folder / "model.safetensors")
        assert m["weights_sha256"] == {"model.safetensors": digest}
        assert set(m["eval"]) == {"shakespeare", "code"}
    last = manifests[-1]
    assert set(last["tokens"]) == {"speeches", "notes"}
    assert abs(sum(last["merge_weights"].values()) - 1.0) < 1e-9
    assert last["tokens"]["notes"]["replay"] > 0  # round 2 mixes in replay
    records = read_metrics(run_dir)
    assert [r["round"] for r in records] == [0, 1, 2]
    # Where each round's time went, and the time outside the rounds.
    assert set(records[-1]["round_parts"]) == {"broadcast", "previous_version", "gather",
                                               "validate", "merge", "commit", "evaluate"}
    assert all(v >= 0 for v in records[-1]["round_parts"].values())
    assert records[-1]["load_seconds"]["notes"] > 0 and records[-1]["read_seconds"]["notes"] > 0
    timing = json.loads((run_dir / "timing.json").read_text())
    assert set(timing["startup"]) == {"ray", "coordinator", "first_version", "workers",
                                      "first_version_wait", "worker_init"}
    assert timing["startup"]["first_version"] > 0  # evaluated and written beside the workers
    assert timing["startup"]["worker_init"]["notes"]["engine"] > 0
    assert timing["finish"]["last_version"] >= 0
    # The recorded perplexity is the real one: recomputed from the saved v0002 on the run's
    # shakespeare set (same tokenizer and seq_len), it matches the manifest and metrics.
    config = load_config(run_dir / "config.yaml")
    shakespeare = next(e for e in config.eval if e.name == "shakespeare")
    data = load_eval_set(shakespeare, tokenizer=load_tokenizer(config.model.tokenizer),
                         seq_len=config.worker.seq_len)
    saved = AutoModelForCausalLM.from_pretrained(run_dir / "versions" / "v0002",
                                                 dtype=torch.float32, use_safetensors=True)
    measured = perplexity(saved, data)
    assert last["eval"]["shakespeare"]["perplexity"] == pytest.approx(measured, rel=1e-6)
    assert records[-1]["eval_perplexity"]["shakespeare"] == pytest.approx(measured, rel=1e-6)
    snapshot = run_dir / last["replay"]
    strata = json.loads((snapshot / "state.json").read_text())["strata"]
    # One stratum per increment file trained (replay.strata: file), each from its site (a
    # sequence belongs to the file of its first token).
    trained = {f"{site}/{Path(r['file']).name}" for m in all_manifests(run_dir)
               for site, ranges in m["increments"].items() for r in ranges}
    assert len(strata) >= 2 and {s["name"] for s in strata} <= trained
    assert all(s["name"].startswith(s["site"] + "/") for s in strata)
    replay = ds.dataset(sorted(str(f) for f in snapshot.glob("*.parquet")),
                        format="parquet").to_table()
    assert replay.num_rows > 0 and replay.column_names == ["input_ids", "length", "round"]
    assert set(replay.column("round").to_pylist()) <= {1, 2}  # the round each arrived in


def test_continual_metrics_and_schedule_are_recorded(two_rounds):
    run_dir, _ = two_rounds
    manifests = all_manifests(run_dir)
    first, last = manifests[0], manifests[-1]
    assert first["transfer"] == {"backward_transfer": 0.0, "newest_gain": 0.0}
    start, now = first["eval"], last["eval"]
    # `code` is the newest set in these runs; shakespeare counts towards backward transfer.
    assert last["transfer"]["newest_gain"] == pytest.approx(
        1 - now["code"]["perplexity"] / start["code"]["perplexity"])
    assert last["transfer"]["backward_transfer"] == pytest.approx(
        1 - now["shakespeare"]["perplexity"] / start["shakespeare"]["perplexity"])
    record = read_metrics(run_dir)[1]
    for site, lrs in record["lr"].items():  # rewarm: the first step of an increment warms up
        assert len(lrs) == record["steps"][site] and max(lrs) <= 1e-3 + 1e-12
    assert min(lrs[0] for lrs in record["lr"].values()) < 1e-3
    # Time outside training, and the traffic: fp32 deltas are the model's size.
    assert record["overhead_seconds"] == pytest.approx(
        record["round_seconds"] - max(record["train_seconds"].values()))
    assert 0 < record["overhead_seconds"] < record["round_seconds"]
    weights = load_file(str(run_dir / "versions" / "v0001" / "model.safetensors"))
    model_bytes = sum(t.numel() * 4 for t in weights.values())
    assert set(record["bytes_sent"].values()) == {model_bytes}
    assert set(record["bytes_received"].values()) == {model_bytes}


def test_every_consumed_row_is_accounted_for_exactly_once(two_rounds, notes_site):
    run_dir, _ = two_rounds
    assert_rows_exactly_once(run_dir, "speeches", text_column="text")
    notes = assert_rows_exactly_once(run_dir, "notes", text_column="body")
    files = sorted({Path(r["file"]).name for r in notes})
    assert len(files) >= 2  # the notes site crosses file boundaries within the run
    assert files == [p.name for p in increment_files(notes_site)][:len(files)]


def test_lineage_names_each_version_that_read_a_file_and_those_built_on_it(
        two_rounds, notes_site, capsys):
    from trainer.cli import main as cli

    run_dir, _ = two_rounds
    manifests = all_manifests(run_dir)
    read = {e["file"]: [m["name"] for m in manifests if any(
        x["file"] == e["file"] for x in m["increments"].get("notes", []))]
        for m in manifests for e in m["increments"].get("notes", [])}
    assert read, "the run read no notes file"
    for file, versions in read.items():
        assert cli(["lineage", str(run_dir), "--file", file, "--json"]) == 0
        touches = json.loads(capsys.readouterr().out)
        assert [t["version"] for t in touches if t["how"] == "direct"] == versions
        # Every accepted version from the first reader on saw it: directly, by replay or
        # by descent.
        first = int(versions[0][1:])
        assert [t["version"] for t in touches] == [m["name"] for m in manifests
                                                   if m["version"] >= first]
    unread = sorted({str(p) for p in notes_site.glob("*.jsonl")} - set(read))
    for file in unread:
        assert cli(["lineage", str(run_dir), "--file", file]) == 0
        assert "no version saw that data" in capsys.readouterr().out


def test_workers_are_named_actors_and_ray_metrics_are_served(two_rounds):
    _, seen = two_rounds
    assert {"tributary-worker-speeches", "tributary-worker-notes"} <= seen["actors"]
    assert seen["metrics_during_run"], "no tributary_ metric was served while the run ran"
    missing = EXPECTED_METRICS - seen["metrics"]
    assert not missing, f"not served: {missing}; served: {seen['metrics']}"
    # The lists above name every metric Tributary defines, none left out.
    defined = {f"ray_{metric._name}" for metric in vars(RayMetrics(run="probe")).values()}
    assert defined == EXPECTED_METRICS | ON_FAILURE_METRICS | ASYNC_METRICS


def test_latest_loads_with_plain_transformers_and_generates(two_rounds):
    run_dir, _ = two_rounds
    latest = run_dir / "versions" / "latest"
    model = AutoModelForCausalLM.from_pretrained(latest)
    tokenizer = AutoTokenizer.from_pretrained(latest)
    inputs = tokenizer("Fellow citizens", return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=5, do_sample=False,
                         pad_token_id=tokenizer.eos_token_id)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 5


def test_resumed_run_equals_uninterrupted_run(two_rounds, demo_root, notes_site, tmp_path):
    run_dir, _ = two_rounds
    split = tmp_path / "run"
    run_training(tiny_config(demo_root, notes_site, split, rounds=1))
    assert (split / "versions" / "latest").resolve().name == "v0001"
    run_training(tiny_config(demo_root, notes_site, split, rounds=2), resume=True)

    expected = load_file(str(run_dir / "versions" / "v0002" / "model.safetensors"))
    resumed = load_file(str(split / "versions" / "v0002" / "model.safetensors"))
    assert expected.keys() == resumed.keys()
    assert all(torch.equal(expected[k], resumed[k]) for k in expected)
    a, b = all_manifests(run_dir)[-1], all_manifests(split)[-1]
    assert a["increments"] == b["increments"]
    assert a["cursors"] == b["cursors"] and a["tokens"] == b["tokens"]


def test_sharded_merge_equals_the_coordinator_merge(two_rounds, demo_root, notes_site,
                                                    tmp_path):
    """Three reducers each combine a slice of every delta where it lies; the result is the
    same float for float as the coordinator averaging whole deltas. (The notes site is read
    through pyarrow's filesystem layer here, by a file:// URI: the same rows, by name.)"""
    run_dir = tmp_path / "sharded"
    uri = f"file://{notes_site}"
    run_training(tiny_config(demo_root, notes_site, run_dir,
                             **{"merge.reducers": 3, "sites.notes.path": uri}))
    expected = load_file(str(two_rounds[0] / "versions" / "v0002" / "model.safetensors"))
    sharded = load_file(str(run_dir / "versions" / "v0002" / "model.safetensors"))
    assert all(torch.equal(expected[k], sharded[k]) for k in expected)
    assert [r["workers_ok"] for r in read_metrics(run_dir)] == [0, 2, 2]
    assert all(r["file"].startswith(f"{uri}/part-") for m in all_manifests(run_dir)
               for r in m["increments"].get("notes", []))
    assert_rows_exactly_once(run_dir, "notes", text_column="body")
    alive = [a for a in ray.util.state.list_actors(
        address=ray.get_runtime_context().gcs_address, filters=[("state", "=", "ALIVE")])
             if a["class_name"] == "ShardReducer"]
    assert alive == [], "reducers outlived their run"


def test_outer_momentum_state_is_checkpointed_and_resumed(ray_cluster, demo_root, notes_site,
                                                          tmp_path):
    """DiLoCo's outer momentum is state: a resume that lost it would merge differently."""
    options = {"merge.strategy": "momentum"}
    straight, split = tmp_path / "straight", tmp_path / "split"
    run_training(tiny_config(demo_root, notes_site, straight, rounds=2, **options))
    run_training(tiny_config(demo_root, notes_site, split, rounds=1, **options))
    velocity = load_file(str(split / "versions" / "v0001" / "outer_state.safetensors"))
    assert velocity and all(torch.isfinite(v).all() for v in velocity.values())
    run_training(tiny_config(demo_root, notes_site, split, rounds=2, **options), resume=True)
    expected = load_file(str(straight / "versions" / "v0002" / "model.safetensors"))
    resumed = load_file(str(split / "versions" / "v0002" / "model.safetensors"))
    assert all(torch.equal(expected[k], resumed[k]) for k in expected)


def test_site_scoped_replay_never_leaves_the_site(ray_cluster, demo_root, notes_site, tmp_path):
    """(This run also keeps the weights of one version only: lineage must survive.)"""
    run_dir = tmp_path / "run"
    run_training(tiny_config(demo_root, notes_site, run_dir,
                             **{"replay.scope": "site", "run.keep_versions": 1}))
    assert [m["version"] for m in all_manifests(run_dir)] == [0, 1, 2]
    assert not (run_dir / "versions" / "v0001" / "model.safetensors").exists()
    assert (run_dir / "versions" / "latest" / "model.safetensors").is_file()
    last = all_manifests(run_dir)[-1]
    assert all(tokens["replay"] > 0 for tokens in last["tokens"].values())  # replay was used
    assert list((run_dir / last["replay"]).glob("*.parquet")) == []  # nothing reached the store
    for site in ("speeches", "notes"):
        local = run_dir / "sites" / site / "state" / "round-0002" / "replay" / "state.json"
        held = json.loads(local.read_text())["strata"]
        assert held and all(s["site"] == site for s in held), f"{site} kept no local replay"
