"""Config validation: every error names its dotted key; every shipped config loads."""

import dataclasses
import json
from pathlib import Path

import pytest
import yaml

from trainer.config import (
    ConfigError,
    apply_override,
    config_from_dict,
    load_config,
    resolve_paths,
)

REPO = Path(__file__).resolve().parents[2]


def minimal(tmp_path: Path) -> dict:
    (tmp_path / "site").mkdir(exist_ok=True)
    return {"run": {"dir": str(tmp_path / "run")}, "rounds": 2,
            "model": {"source": "random", "tokenizer": "gpt2", "architecture": {"hidden_size": 8}},
            "sites": [{"name": "a", "path": str(tmp_path / "site")}],
            "worker": {"deepspeed": {"zero_optimization": {"stage": 0}}}}


def problems_of(raw: dict, overrides=()) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        config_from_dict(raw, overrides=list(overrides))
    return caught.value.problems


def test_minimal_config_gets_defaults(tmp_path):
    config = config_from_dict(minimal(tmp_path))
    assert config.replay.ratio == 0.25 and config.sites[0].text_column == "text"


def test_unknown_key_is_named_with_a_suggestion(tmp_path):
    raw = minimal(tmp_path)
    raw["worker"]["local_step"] = 3
    assert problems_of(raw) == ["worker.local_step: unknown key; did you mean 'local_steps'?"]


def test_wrong_type_names_the_key(tmp_path):
    raw = minimal(tmp_path)
    raw["sites"][0]["text_column"] = 5
    raw["rounds"] = "many"
    problems = problems_of(raw)
    assert "rounds: expected int or null, found 'many'" in problems
    assert "sites[0].text_column: expected str, found 5" in problems


def test_missing_path_and_impossible_values_are_all_reported(tmp_path):
    raw = minimal(tmp_path)
    raw["sites"].append({"name": "b", "path": str(tmp_path / "nowhere")})
    raw["replay"] = {"ratio": 1.5}
    raw["merge"] = {"min_workers": 0}
    problems = problems_of(raw)
    assert any(p.startswith("sites[1].path:") and "does not exist" in p for p in problems)
    assert any(p.startswith("replay.ratio:") for p in problems)
    assert any(p.startswith("merge.min_workers:") for p in problems)


def test_replay_ratio_must_fit_the_batch(tmp_path):
    raw = minimal(tmp_path)
    raw["replay"] = {"ratio": 0.1}
    raw["worker"]["batch_size"] = 4
    (problem,) = problems_of(raw)
    assert problem.startswith("replay.ratio: 0.1 x worker.batch_size 4 gives 0 replay")


def test_model_folder_must_exist_and_hold_safetensors(tmp_path):
    raw = minimal(tmp_path)
    raw["model"] = {"source": str(tmp_path / "nowhere"), "tokenizer": "gpt2"}
    assert problems_of(raw)[0].startswith("model.source: ")
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text("{}")
    (pickled / "pytorch_model.bin").write_bytes(b"pickle")
    raw["model"]["source"] = str(pickled)
    (problem,) = problems_of(raw)
    assert "no .safetensors weights" in problem and "never loads pickle" in problem


def test_missing_required_key(tmp_path):
    raw = minimal(tmp_path)
    del raw["rounds"]
    assert problems_of(raw) == ["rounds: required key is missing"]


def test_set_overrides_keep_yaml_types(tmp_path):
    config = config_from_dict(minimal(tmp_path), overrides=["worker.lr=0.5", "rounds=7"])
    assert config.worker.lr == 0.5 and config.rounds == 7
    assert problems_of(minimal(tmp_path), ["worker.lr"]) == [
        "--set 'worker.lr': expected key.path=value"]


def test_malformed_yaml_names_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("rounds: [1, 2\n")
    with pytest.raises(ConfigError, match="bad.yaml"):
        load_config(path)


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_yaml_config_loads(path, demo_root, monkeypatch):
    monkeypatch.chdir(demo_root)  # configs name data/demo/... relative to the repo root
    config = load_config(path)
    assert config.sites and config.rounds >= 1


@pytest.mark.parametrize(("name", "sites"), [("node-8gpu", 1), ("two-nodes-8gpu", 2)])
def test_the_fleet_configs_run_each_site_as_8_ranks_at_zero3_in_bf16(name, sites, demo_root,
                                                                     monkeypatch):
    monkeypatch.chdir(demo_root)
    config = load_config(REPO / "configs" / f"{name}.yaml")
    assert len(config.sites) == sites
    for site in config.sites:
        ds = config.train_spec(site.name).deepspeed
        assert site.num_workers == 8 and config.worker_for(site.name).num_gpus == 1
        assert ds["zero_optimization"]["stage"] == 3 and ds["bf16"]["enabled"]


@pytest.mark.parametrize("path", sorted((REPO / "configs").rglob("*.json")), ids=lambda p: p.name)
def test_every_shipped_deepspeed_config_parses(path):
    config = json.loads(path.read_text())
    assert "zero_optimization" in config


def test_yaml_is_loaded_safely(tmp_path):
    path = tmp_path / "evil.yaml"
    path.write_text("rounds: !!python/object/apply:os.system ['true']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(path)
    assert yaml.safe_load("a: 1") == {"a": 1}


def test_continual_learning_settings_are_checked_by_key(tmp_path):
    raw = minimal(tmp_path)
    raw["worker"].update(lr_schedule={"kind": "cyclic", "decay_steps": 0, "min_lr_ratio": 2},
                         prox_mu=-1, early_stopping={"max_epochs": 0, "holdout_fraction": 0.9})
    raw["replay"] = {"balance": "random", "age_weight": -0.5,
                     "schedule": [{"from_round": 0, "ratio": 0.5}, {"from_round": 3, "ratio": 1.5}]}
    assert sorted(p.split(":")[0] for p in problems_of(raw)) == [
        "replay.age_weight", "replay.balance", "replay.schedule[0].from_round",
        "replay.schedule[1].ratio", "worker.early_stopping.holdout_fraction",
        "worker.early_stopping.max_epochs", "worker.lr_schedule.decay_steps",
        "worker.lr_schedule.kind", "worker.lr_schedule.min_lr_ratio", "worker.prox_mu"]


def test_continual_learning_settings_reach_every_worker(tmp_path):
    raw = minimal(tmp_path)
    raw["worker"].update(lr_schedule={"kind": "rewarm", "warmup_steps": 2}, prox_mu=0.01,
                         early_stopping={"max_epochs": 3, "holdout_fraction": 0.1})
    raw["replay"] = {"balance": "sites", "age_weight": 1.0, "scope": "site",
                     "schedule": [{"from_round": 4, "ratio": 0.5}]}
    config = config_from_dict(raw)
    spec = config.train_spec()
    assert spec.worker is config.worker and spec.replay is config.replay  # the same values
    w = spec.worker
    assert (w.lr_schedule.kind, w.lr_schedule.warmup_steps) == ("rewarm", 2)
    assert w.prox_mu == 0.01 and w.early_stopping.max_epochs == 3
    assert [(s.from_round, s.ratio) for s in spec.replay.schedule] == [(4, 0.5)]
    assert (spec.replay.balance, spec.replay.age_weight) == ("sites", 1.0)
    assert spec.local_replay_capacity == config.replay_capacity() > 0


def test_the_merge_section_builds_its_strategy(tmp_path):
    raw = minimal(tmp_path)
    raw["merge"] = {"strategy": "momentum", "outer_lr": 0.5, "outer_momentum": 0.8,
                    "nesterov": False}
    strategy = config_from_dict(raw).merge.build()
    assert (type(strategy).__name__, strategy.lr, strategy.momentum, strategy.nesterov) == (
        "OuterMomentum", 0.5, 0.8, False)


def test_merge_strategy_settings_are_checked_by_key(tmp_path):
    raw = minimal(tmp_path)
    raw["merge"] = {"strategy": "fedsgd", "outer_lr": 0, "outer_momentum": 1.0,
                    "adam_betas": [0.9], "trim_fraction": 0.5}
    assert sorted(p.split(":")[0] for p in problems_of(raw)) == [
        "merge.adam_betas", "merge.outer_lr", "merge.outer_momentum", "merge.strategy",
        "merge.trim_fraction"]


def test_list_entries_are_overridden_by_index_or_name():
    raw = {"sites": [{"name": "a", "path": "x"}, {"name": "b", "path": "y"}]}
    problems: list[str] = []
    apply_override(raw, "sites[0].path=/shared/a", problems)
    apply_override(raw, "sites.b.resources={site_b: 1}", problems)
    assert raw["sites"] == [{"name": "a", "path": "/shared/a"},
                            {"name": "b", "path": "y", "resources": {"site_b": 1}}]
    apply_override(raw, "sites.7.path=z", problems)
    apply_override(raw, "sites.c.path=z", problems)
    assert problems == ["--set sites.7.path: no entry '7' (a list takes an index or a name)",
                        "--set sites.c.path: no entry 'c' (a list takes an index or a name)"]


def test_uri_paths_are_kept_as_they_are(tmp_path):
    raw = {"run": {"dir": "s3://bucket/runs/a"}, "rounds": 1,
           "sites": [{"name": "a", "path": f"file://{tmp_path}"}]}
    config = resolve_paths(config_from_dict(raw))
    assert config.run.dir == "s3://bucket/runs/a"
    assert config.sites[0].path == f"file://{tmp_path}"
    with pytest.raises(ConfigError, match=r"sites\[0\].path: file:///nowhere does not exist"):
        config_from_dict({**raw, "sites": [{"name": "a", "path": "file:///nowhere"}]})


def test_overlapping_places_are_refused(tmp_path):
    raw = minimal(tmp_path)
    site = tmp_path / "site"
    (site / "sub").mkdir()
    (site / "held.txt").write_text("held-out text")
    raw["sites"].append({"name": "b", "path": str(site / "sub")})
    raw["run"]["dir"] = str(site / "run")
    raw["eval"] = [{"name": "e", "path": str(site / "held.txt")}]
    problems = problems_of(raw)
    assert any(p.startswith("sites[1].path: overlaps sites[0].path") for p in problems)
    assert any(p.startswith("run.dir: inside sites[0].path") for p in problems)
    assert any(p.startswith("eval[0].path: inside sites[0].path") and "trained on" in p
               for p in problems)


def test_a_link_leading_out_of_a_site_folder_is_refused(tmp_path):
    raw = minimal(tmp_path)
    outside = tmp_path / "private.jsonl"
    outside.write_text('{"text": "x"}\n')
    (tmp_path / "site" / "inside.jsonl").symlink_to(outside)
    (tmp_path / "site" / "fine.jsonl").write_text('{"text": "y"}\n')
    (tmp_path / "site" / "also-fine.jsonl").symlink_to(tmp_path / "site" / "fine.jsonl")
    (problem,) = problems_of(raw)
    assert problem.startswith("sites[0].path: inside.jsonl is a symbolic link to")
    assert "outside the site's folder" in problem


def test_architecture_keys_tributary_sets_itself_are_a_config_error(tmp_path):
    raw = minimal(tmp_path)
    raw["model"]["architecture"]["vocab_size"] = 100
    expected = ("model.architecture.vocab_size: Tributary sets this from the tokenizer "
                "(model.tokenizer); remove it")
    assert problems_of(raw) == [expected]


def test_a_sites_own_worker_settings_replace_the_runs_for_that_site_only(tmp_path):
    raw = minimal(tmp_path)
    (tmp_path / "fast").mkdir()
    ds = tmp_path / "big.json"
    ds.write_text(json.dumps({"zero_optimization": {"stage": 2}}))
    raw["sites"].append({"name": "big", "path": str(tmp_path / "fast"),
                         "worker": {"local_steps": 32, "num_gpus": 8, "deepspeed": str(ds)}})
    config = config_from_dict(raw)
    big, small = config.train_spec("big"), config.train_spec("a")
    assert (big.worker.local_steps, big.worker.num_gpus) == (32, 8)
    assert big.deepspeed == {"zero_optimization": {"stage": 2}}
    assert big.worker.lr == small.worker.lr == config.worker.lr  # the rest is the run's
    assert small.worker == config.worker and small.deepspeed == {"zero_optimization": {"stage": 0}}


def test_deepspeed_settings_tributary_cannot_run_are_named(tmp_path):
    raw = minimal(tmp_path)
    raw["worker"]["prox_mu"] = 0.01
    raw["worker"]["deepspeed"] = {"zero_optimization": {"stage": 3}}
    (problem,) = problems_of(raw)
    assert problem.startswith("worker.prox_mu: site 'a' runs ZeRO-3 (worker.deepspeed)")
    raw["worker"]["prox_mu"] = 0
    config_from_dict(raw)  # ZeRO-3 itself is fine
    raw["sites"][0]["worker"] = {"deepspeed": {
        "zero_optimization": {"stage": 2, "offload_param": {"device": "cpu"}},
        "bf16": {"enabled": True}, "fp16": {"enabled": True}}}
    problems = problems_of(raw)
    assert any(p.startswith("sites[0].worker.deepspeed: zero_optimization.offload_param: "
                            "offloads parameters at ZeRO-3 only") for p in problems)
    assert "sites[0].worker.deepspeed: bf16, fp16: enable one of them, not both" in problems


def test_a_sites_worker_settings_are_checked_under_its_key(tmp_path):
    raw = minimal(tmp_path)
    raw["sites"][0]["worker"] = {"local_steps": 0, "batch_size": 2, "num_cpus": -1,
                                 "deepspeed": str(tmp_path / "missing.json")}
    raw["replay"] = {"ratio": 0.25}
    problems = problems_of(raw)
    assert "sites[0].worker.local_steps: must be at least 1" in problems
    assert "sites[0].worker.num_cpus: must be greater than 0" in problems
    assert any(p.startswith("sites[0].worker.deepspeed:") and "does not exist" in p
               for p in problems)
    assert any(p.startswith("replay.ratio: 0.25 x sites[0].worker.batch_size 2 gives 0")
               for p in problems)
    assert not any(p.startswith("worker.") for p in problems), "the run's values are fine"
    raw["sites"][0]["worker"] = {"seq_len": 64}  # run-wide: every site packs alike
    (problem,) = problems_of(raw)
    assert problem.startswith("sites[0].worker.seq_len: unknown key")


def test_async_merge_settings_are_checked_by_key(tmp_path):
    raw = minimal(tmp_path)
    raw["merge"] = {"mode": "eventually", "buffer": 0, "staleness_exponent": -1,
                    "max_staleness": -2}
    raw["run"]["eval_every"] = 0
    assert sorted(p.split(":")[0] for p in problems_of(raw)) == [
        "merge.buffer", "merge.max_staleness", "merge.mode", "merge.staleness_exponent",
        "run.eval_every"]
    raw = minimal(tmp_path)
    raw["run"]["eval_every"] = 4  # sync evaluates every round: its gate needs it
    (problem,) = problems_of(raw)
    assert problem.startswith("run.eval_every: applies to merge.mode async only")
    raw["merge"] = {"mode": "async"}
    assert config_from_dict(raw).run.eval_every == 4


def test_model_dtype_sets_the_sites_precision_and_must_agree_with_deepspeed(tmp_path):
    raw = minimal(tmp_path)
    raw["model"]["dtype"] = "bf16"
    spec = config_from_dict(raw).train_spec("a")
    assert spec.deepspeed["bf16"] == {"enabled": True}
    assert spec.deepspeed["zero_optimization"] == {"stage": 0}
    raw["worker"]["deepspeed"]["fp16"] = {"enabled": True}
    (problem,) = problems_of(raw)
    assert problem == ("model.dtype, worker.deepspeed: model.dtype is bf16 but the DeepSpeed "
                       "config enables fp16; remove one of them")
    raw["model"]["dtype"] = "int8"
    assert "model.dtype: must be one of ('fp32', 'bf16', 'fp16'), found 'int8'" in problems_of(raw)


def test_a_model_folder_without_a_tokenizer_must_name_one(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(b"")
    raw = minimal(tmp_path)
    raw["model"] = {"source": str(folder)}
    (problem,) = problems_of(raw)
    assert problem.startswith(f"model.source: {folder} holds no tokenizer")
    raw["model"]["tokenizer"] = "gpt2"
    assert config_from_dict(raw).model.tokenizer_source() == "gpt2"
    (folder / "tokenizer.json").write_text("{}")
    raw["model"].pop("tokenizer")
    assert config_from_dict(raw).model.tokenizer_source() == str(folder)


def test_the_shard_size_of_versions_is_a_size(tmp_path):
    raw = minimal(tmp_path)
    raw["run"]["max_shard_size"] = "2MB"
    assert config_from_dict(raw).run.max_shard_size == "2MB"
    raw["run"]["max_shard_size"] = "big"
    assert problems_of(raw) == [
        "run.max_shard_size: must be a size such as 5GB or 500MB, found 'big'"]


def test_the_workers_malloc_threshold_is_auto_glibc_or_a_byte_count(tmp_path):
    raw = minimal(tmp_path)
    worker = config_from_dict(raw).worker
    assert worker.malloc_mmap_threshold == "auto"
    assert worker.mmap_threshold(zero_stage=3) == 65536  # ZeRO-3 on CPU: host memory
    assert worker.mmap_threshold(zero_stage=2) is None  # glibc's own: faster
    gpu = dataclasses.replace(worker, num_gpus=1)
    assert gpu.mmap_threshold(zero_stage=3) is None  # the states live in GPU memory
    raw["worker"]["malloc_mmap_threshold"] = "glibc"
    assert config_from_dict(raw).worker.mmap_threshold(zero_stage=3) is None
    raw["worker"]["malloc_mmap_threshold"] = 131072
    assert config_from_dict(raw).worker.mmap_threshold(zero_stage=0) == 131072
    raw["worker"]["malloc_mmap_threshold"] = -1
    assert problems_of(raw) == [("worker.malloc_mmap_threshold: must be auto, glibc or a byte "
                                 "count between 0 and 33554432, found -1")]
