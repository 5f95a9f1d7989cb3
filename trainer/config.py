"""Run configuration: YAML validated into frozen, typed dataclasses.

Every problem is collected and reported at once, each naming its dotted key
(`sites[1].path: ...`). Unknown keys are rejected with a suggestion. Nothing here
starts Ray or loads a model, so a bad config fails in milliseconds.
"""

from __future__ import annotations

import dataclasses
import difflib
import fnmatch
import json
import os
import re
import statistics
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import pyarrow as pa
import pyarrow.fs as pafs
import yaml

from trainer.strategies import STRATEGIES, MergeConfig
from workers.compression import COMPRESSIONS
from workers.engine import precision
from workers.lora import LoraSpec
from workers.replay import BALANCE_MODES, STRATA_KINDS, ReplayConfig
from workers.schedule import SCHEDULE_KINDS
from workers.storage import is_uri, locate, redact
from workers.types import SiteConfig, TrainSpec, WorkerConfig

BUILTIN_MODELS = ("smollm2", "random")
GATE_BASELINES = ("best", "start")  # what a protected eval set is judged against
# model.architecture keys that come from the tokenizer, never from the config.
SET_FROM_TOKENIZER = {"vocab_size", "bos_token_id", "eos_token_id", "pad_token_id"}
BUILTIN_TOKENIZERS = ("smollm2", "gpt2")
# What a model folder ships when it ships its tokenizer.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
DTYPES = ("fp32", "bf16", "fp16")
# fp32, no ZeRO partitioning: right for one CPU or GPU per worker; see configs/deepspeed/.
DEFAULT_DEEPSPEED = {"zero_optimization": {"stage": 0}, "gradient_clipping": 1.0,
                     "steps_per_print": 1_000_000}


class ConfigError(ValueError):
    """A config that cannot run; `problems` lists every `key: message`."""

    def __init__(self, problems: list[str], *, source: str = "config") -> None:
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"{source} has {len(problems)} problem(s):\n{lines}")


@dataclass(frozen=True)
class RunConfig:
    dir: str
    seed: int = 0
    # Keep the weights of only the newest N versions (manifests always stay); None: keep all.
    keep_versions: int | None = None
    # Evaluate and write version v while round v+1 trains (a run with a quality gate still
    # evaluates first: the gate decides what the next round starts from).
    overlap: bool = True
    # With watched sites: how long to wait before looking again when no site has anything new.
    poll_s: float = 10.0
    # Evaluate (and gate, and write the weights of) every N-th version; every version's
    # manifest is written. Mostly for merge.mode async, whose merges come often.
    eval_every: int = 1
    # Versions larger than this are written as several safetensors files and an index
    # (what `from_pretrained` reads); the Hugging Face Hub's convention.
    max_shard_size: str = "5GB"


@dataclass(frozen=True)
class ModelConfig:
    # "smollm2" (the shipped SmolLM2-135M), "random" (built from `architecture`),
    # or a local Hugging Face model folder.
    source: str = "smollm2"
    # "smollm2", "gpt2" or a tokenizer folder; null: the model's own (a folder's, SmolLM2's).
    tokenizer: str | None = None
    architecture: dict = field(default_factory=dict)
    # Federate LoRA adapters instead of full weights (workers/lora.py); null: full weights.
    lora: LoraSpec | None = None
    # The sites' weights in "fp32", "bf16" or "fp16" (DeepSpeed's mixed precision, with fp32
    # master weights); null: as the DeepSpeed config says. The global model stays fp32.
    dtype: str | None = None

    def tokenizer_source(self) -> str:
        """The tokenizer to load: the one named, else the model's own."""
        if self.tokenizer is not None:
            return self.tokenizer
        return "smollm2" if self.source in BUILTIN_MODELS else self.source


@dataclass(frozen=True)
class Cover:
    """The increments an eval set stands for: a site's files (names or patterns; none: all)."""

    site: str
    files: list[str] = field(default_factory=list)

    def strata(self, known: Sequence[str], *, groups: dict[str, list[str]] | None = None
               ) -> list[str]:
        """The replay strata among `known` that hold these increments: files of the site
        (`site/file`), a named group holding such files (`replay.groups`), or the site itself
        (`replay.strata: site`). The file names themselves when the strata are not known
        here (`replay.scope: site`: they live on the workers)."""
        patterns = [f"{self.site}/{f}" for f in self.files or ["*"]]
        if not known:
            return patterns if self.files else [self.site]
        groups = groups or {}
        return [s for s in known if s == self.site
                or (s in groups and any(_overlap(p, g) for p in patterns for g in groups[s]))
                or (s not in groups and any(fnmatch.fnmatchcase(s, p) for p in patterns))]


def _overlap(pattern: str, group: str) -> bool:
    """Can a file match both patterns? (Either one matching the other is taken as yes.)"""
    return fnmatch.fnmatchcase(pattern, group) or fnmatch.fnmatchcase(group, pattern)


@dataclass(frozen=True)
class EvalSetConfig:
    name: str
    path: str
    text_column: str = "text"
    max_tokens: int = 4096
    # A protected set may not regress past quality.max_regression, or the version is rejected.
    protected: bool = False
    # What a protected set is judged against: the best accepted version so far ("best"), or
    # the start version ("start").
    gate_against: str = "best"
    # The increments this set stands for: the forgetting budget steers their replay.
    covers: Cover | None = None
    # Held-out data of the newest increments: its improvement is reported as the newest gain;
    # every other set counts towards backward transfer.
    newest: bool = False


@dataclass(frozen=True)
class QualityConfig:
    # Largest relative perplexity rise of a protected eval set over its baseline (the best
    # accepted version so far, or the start: eval[].gate_against).
    max_regression: float = 0.05
    # How sure a change must be before the gate (or the forgetting budget) acts on it: the
    # one-sided confidence of a paired bootstrap over the eval set's documents.
    confidence: float = 0.95
    # Candidates rejected in a row after which the run stops instead of consuming more data.
    max_rejections: int = 3

    def z(self) -> float:
        return statistics.NormalDist().inv_cdf(self.confidence)


@dataclass(frozen=True)
class ClusterConfig:
    # None: join RAY_ADDRESS if set, else start an embedded local cluster.
    address: str | None = None
    num_cpus: int | None = None
    dashboard_host: str = "127.0.0.1"
    dashboard_port: int = 8265
    include_dashboard: bool = True
    # How long a run waits for a site's workers to be placed before it reports them (with
    # what they ask for and what the cluster has) and goes on without them.
    placement_timeout_s: float = 30.0


@dataclass(frozen=True)
class Config:
    run: RunConfig
    rounds: int | None  # None: until stopped (SIGTERM finishes the round and exits)
    sites: list[SiteConfig]
    model: ModelConfig = field(default_factory=ModelConfig)
    eval: list[EvalSetConfig] = field(default_factory=list)
    worker: WorkerConfig = field(default_factory=WorkerConfig)
    replay: ReplayConfig = field(default_factory=ReplayConfig)
    merge: MergeConfig = field(default_factory=MergeConfig)
    quality: QualityConfig = field(default_factory=QualityConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def replay_capacity(self) -> int:
        """Sequences the shared replay store may hold (replay.capacity_tokens)."""
        return self.replay.capacity_tokens // self.worker.seq_len

    def worker_for(self, site: str) -> WorkerConfig:
        """The run's worker settings with the site's own (`sites[].worker`) in place."""
        own = next(s.worker for s in self.sites if s.name == site)
        return dataclasses.replace(self.worker, **own.set())

    def train_spec(self, site: str | None = None) -> TrainSpec:
        """What a site's workers are told: the config sections as they are (the worker
        settings with the site's own in place), and the run-wide settings that shape a
        round."""
        # replay.scope site: each worker keeps its site's share of the capacity.
        local = self.replay_capacity() // len(self.sites) if self.replay.scope == "site" else 0
        worker = self.worker if site is None else self.worker_for(site)
        return TrainSpec(worker=worker, replay=self.replay,
                         deepspeed=with_dtype(deepspeed_dict(worker), self.model.dtype),
                         seed=self.run.seed,
                         compression=self.merge.compression,
                         error_feedback=self.merge.error_feedback, lora=self.model.lora,
                         local_replay_capacity=local, keep_states=self.run.keep_versions)


# ---------------------------------------------------------------- loading


def load_config(source: str | os.PathLike, *, text: str | None = None,
                overrides: list[str] = (), check_files: bool = True) -> Config:
    """The one way from YAML to a Config: the file `source`, or `text` read from elsewhere
    (an environment variable, a bucket) and called `source` in errors. `--set key.path=value`
    overrides are applied, then everything is validated (`check_files=False`: data, model and
    DeepSpeed files live on a cluster's storage and are not checked here)."""
    name = str(source)
    if text is None:
        path = Path(source)
        if not path.is_file():
            raise ConfigError([f"config file {path} does not exist"], source=name)
        text = path.read_text()
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError([f"not valid YAML: {exc}"], source=name) from exc
    return config_from_dict(raw, overrides=overrides, source=name, check_files=check_files)


def config_from_dict(raw: Any, *, overrides: list[str] = (), source: str = "config",
                     check_files: bool = True) -> Config:
    """The typed, validated config. `check_files=False` skips checking that data, model and
    DeepSpeed files exist here (`tributary submit`: they are on the cluster's storage)."""
    if not isinstance(raw, dict):
        raise ConfigError(["top level must be a mapping of keys"], source=source)
    problems: list[str] = []
    for item in overrides:
        apply_override(raw, item, problems)
    config = _build(Config, raw, "", problems)
    # Values are checked only when every field has its declared type (unknown keys aside).
    if config is not None and all(": unknown key" in p for p in problems):
        _check_values(config, problems, check_files=check_files)
    if problems:
        raise ConfigError(problems, source=source)
    return config


def apply_override(raw: dict, item: str, problems: list[str]) -> None:
    """`a.b.c=value`; the value is parsed as YAML so numbers and lists keep their type. A list
    entry is named by index or by its `name`: `sites[0].path=...`, `sites.0.path=...` or
    `sites.speeches.path=...`."""
    key, sep, text = item.partition("=")
    if not sep or not key:
        problems.append(f"--set {item!r}: expected key.path=value")
        return
    node: Any = raw
    parts = re.sub(r"\[(\d+)\]", r".\1", key).split(".")
    for part in parts[:-1]:
        node = _child(node, part)
        if node is None:
            problems.append(f"--set {key}: no entry {part!r} (a list takes an index or a name)")
            return
    if not isinstance(node, dict):
        problems.append(f"--set {key}: {'.'.join(parts[:-1])} is not a mapping")
        return
    node[parts[-1]] = yaml.safe_load(text)


def _child(node: Any, part: str) -> Any:
    if isinstance(node, list):
        if part.isdigit():
            return node[int(part)] if int(part) < len(node) else None
        return next((e for e in node if isinstance(e, dict) and e.get("name") == part), None)
    return node.setdefault(part, {}) if isinstance(node, dict) else None


def _build(cls: type, data: Any, prefix: str, problems: list[str]) -> Any:
    """Build dataclass `cls` from `data`, appending `dotted.key: message` to problems."""
    where = prefix or "top level"
    if not isinstance(data, dict):
        problems.append(f"{where}: expected a mapping, found {type(data).__name__}")
        return None
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    for key in data:
        if key not in fields:
            near = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f"; did you mean {near[0]!r}?" if near else f"; known keys: {', '.join(fields)}"
            problems.append(f"{_join(prefix, key)}: unknown key{hint}")
    values = {}
    for name, f in fields.items():
        key = _join(prefix, name)
        if name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                problems.append(f"{key}: required key is missing")
            continue
        values[name] = _convert(hints[name], data[name], key, problems)
    try:
        return cls(**values)
    except TypeError:
        return None  # a required key was missing; already reported


def _convert(hint: Any, value: Any, key: str, problems: list[str]) -> Any:
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        for option in options:
            trial: list[str] = []
            converted = _convert(option, value, key, trial)
            if not trial:
                return converted
        names = " or ".join(_type_name(o) for o in options)
        problems.append(f"{key}: expected {names}, found {value!r}")
        return None
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, key, problems)
    if origin is list:
        if not isinstance(value, list):
            problems.append(f"{key}: expected a list, found {type(value).__name__}")
            return []
        (item_type,) = typing.get_args(hint)
        return [_convert(item_type, v, f"{key}[{i}]", problems) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            problems.append(f"{key}: expected a mapping, found {type(value).__name__}")
            return {}
        key_type, value_type = typing.get_args(hint)
        return {_convert(key_type, k, key, problems): _convert(value_type, v, _join(key, k),
                                                               problems)
                for k, v in value.items()}
    return _convert_scalar(hint, value, key, problems)


def _convert_scalar(hint: Any, value: Any, key: str, problems: list[str]) -> Any:
    if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if hint is type(None) and value is None:
        return None
    ok = isinstance(value, hint) and not (hint is int and isinstance(value, bool))
    if not ok:
        problems.append(f"{key}: expected {_type_name(hint)}, found {value!r}")
    return value


def _type_name(hint: Any) -> str:
    return {type(None): "null", dict: "a mapping"}.get(hint, getattr(hint, "__name__", str(hint)))


def _join(prefix: str, name: Any) -> str:
    return f"{prefix}.{name}" if prefix else str(name)


# ---------------------------------------------------------------- value checks


def _check_values(config: Config, problems: list[str], *, check_files: bool = True) -> None:
    """Checks on values that types cannot express (ranges, paths, uniqueness), section by
    section."""
    need = _need(problems)
    need(config.rounds is None or config.rounds >= 1, "rounds",
         f"must be at least 1, or null to run until stopped; found {config.rounds}")
    need(config.run.poll_s > 0, "run.poll_s", "must be greater than 0")
    need(config.run.eval_every >= 1, "run.eval_every", "must be at least 1")
    need(config.run.eval_every <= 1 or config.merge.mode == "async", "run.eval_every",
         "applies to merge.mode async only (a sync round's gate needs its evaluation); "
         "set merge.mode: async or remove it")
    need(config.cluster.placement_timeout_s > 0, "cluster.placement_timeout_s",
         "must be greater than 0")
    need(re.fullmatch(r"\d+\s*([KMGT]i?B)", str(config.run.max_shard_size), re.IGNORECASE),
         "run.max_shard_size", f"must be a size such as 5GB or 500MB, found "
         f"{config.run.max_shard_size!r}")
    keep = config.run.keep_versions
    need(keep is None or keep >= 1, "run.keep_versions", f"must be at least 1, found {keep}")
    need(config.quality.max_regression >= 0, "quality.max_regression", "must not be negative")
    need(0.5 <= config.quality.confidence < 1, "quality.confidence",
         f"must be in [0.5, 1), found {config.quality.confidence}")
    need(config.quality.max_rejections >= 1, "quality.max_rejections", "must be at least 1")
    _check_places(config, problems, check_files=check_files)
    _check_worker(config.worker, problems, check_files=check_files)
    for i, site in enumerate(config.sites):
        _check_site_worker(config, i, problems, check_files=check_files)
    _check_replay(config, problems)
    _check_training(config.worker, problems)
    _check_merge(config, problems)
    _check_lora(config.model.lora, problems)
    _check_overlaps(config, problems, check_files=check_files)
    need(config.model.dtype in (None, *DTYPES), "model.dtype",
         f"must be one of {DTYPES}, found {config.model.dtype!r}")
    for key in sorted(set(config.model.architecture) & SET_FROM_TOKENIZER):
        problems.append(f"model.architecture.{key}: Tributary sets this from the tokenizer "
                        "(model.tokenizer); remove it")
    if check_files:
        _check_model(config.model, problems)
        _check_deepspeed(config, problems)


def _need(problems: list[str]):
    def need(ok: bool, key: str, message: str) -> None:
        if not ok:
            problems.append(f"{key}: {message}")
    return need


def _check_places(config: Config, problems: list[str], *, check_files: bool) -> None:
    """Sites and eval sets: paths that exist, names that are unique and safe."""
    need = _need(problems)
    need(len(config.sites) >= 1, "sites", "must list at least one site")
    for group, entries in (("sites", config.sites), ("eval", config.eval)):
        names = [entry.name for entry in entries]
        for i, entry in enumerate(entries):
            need(not check_files or _exists(entry.path), f"{group}[{i}].path",
                 f"{entry.path} does not exist")
            need(bool(entry.text_column), f"{group}[{i}].text_column", "must not be empty")
            need(names.count(entry.name) == 1, f"{group}[{i}].name", f"{entry.name!r} is repeated")
            need(_safe_name(entry.name), f"{group}[{i}].name", "use letters, digits, '-', '_' only")
    for i, site in enumerate(config.sites):
        batch = config.worker_for(site.name).batch_size
        need(1 <= site.num_workers <= batch, f"sites[{i}].num_workers",
             f"must be between 1 and the site's batch_size ({batch}; each rank takes a share "
             f"of every batch), found {site.num_workers}")
    site_names = [s.name for s in config.sites]
    for i, entry in enumerate(config.eval):
        need(entry.max_tokens > 0, f"eval[{i}].max_tokens", "must be greater than 0")
        need(entry.covers is None or entry.covers.site in site_names, f"eval[{i}].covers.site",
             f"must be one of the sites {site_names}, found "
             f"{entry.covers.site if entry.covers else None!r}")
        need(entry.gate_against in GATE_BASELINES, f"eval[{i}].gate_against",
             f"must be one of {GATE_BASELINES}, found {entry.gate_against!r}")


def _check_worker(w: WorkerConfig, problems: list[str], *, check_files: bool,
                  prefix: str = "worker") -> None:
    need = _need(problems)
    need(w.local_steps >= 1, f"{prefix}.local_steps", "must be at least 1")
    need(w.batch_size >= 1, f"{prefix}.batch_size", "must be at least 1")
    need(w.seq_len >= 8, f"{prefix}.seq_len", "must be at least 8")
    need(w.lr > 0, f"{prefix}.lr", "must be greater than 0")
    need(w.num_cpus > 0, f"{prefix}.num_cpus", "must be greater than 0")
    need(w.num_gpus >= 0, f"{prefix}.num_gpus", "must not be negative")
    need(w.max_missed_rounds >= 0, f"{prefix}.max_missed_rounds", "must not be negative")
    need(w.max_row_chars >= 1, f"{prefix}.max_row_chars", "must be at least 1")
    threshold = w.malloc_mmap_threshold
    need(threshold in ("auto", "glibc") or (
        isinstance(threshold, int) and 0 <= threshold <= 32 * 2**20),
         f"{prefix}.malloc_mmap_threshold",
         f"must be auto, glibc or a byte count between 0 and 33554432, found {threshold!r}")
    if isinstance(w.deepspeed, str):
        need(not check_files or Path(w.deepspeed).is_file(), f"{prefix}.deepspeed",
             f"{w.deepspeed} does not exist")


def _check_deepspeed(config: Config, problems: list[str]) -> None:
    """What Tributary asks of each site's DeepSpeed config (file or inline)."""
    for i, site in enumerate(config.sites):
        worker = config.worker_for(site.name)
        key = f"sites[{i}].worker.deepspeed" if "deepspeed" in site.worker.set() else \
            "worker.deepspeed"
        if isinstance(worker.deepspeed, str) and not Path(worker.deepspeed).is_file():
            continue  # reported as missing
        try:
            ds = deepspeed_dict(worker)
        except ConfigError as exc:
            problems += [p for p in exc.problems if p not in problems]
            continue
        zero = ds.get("zero_optimization") or {}
        stage = zero.get("stage", 0)
        need = _need(problems)
        need(stage in (0, 1, 2, 3), f"{key}: zero_optimization.stage",
             f"must be 0, 1, 2 or 3, found {stage!r}")
        need(not (ds.get("bf16") or {}).get("enabled") or not (ds.get("fp16") or {}).get(
            "enabled"), f"{key}: bf16, fp16", "enable one of them, not both")
        need(stage == 3 or (zero.get("offload_param") or {}).get("device", "none") == "none",
             f"{key}: zero_optimization.offload_param",
             f"offloads parameters at ZeRO-3 only (stage is {stage}); use offload_optimizer, "
             "or stage 3")
        dtype = config.model.dtype
        need(dtype not in DTYPES or precision(ds) in ("fp32", dtype), f"model.dtype, {key}",
             f"model.dtype is {dtype} but the DeepSpeed config enables {precision(ds)}; "
             "remove one of them")
        need(stage != 3 or worker.prox_mu == 0, "worker.prox_mu",
             f"site {site.name!r} runs ZeRO-3 ({key}), whose parameters are partitioned "
             "outside the forward pass, where FedProx's term reads them whole; set "
             "worker.prox_mu: 0 or use ZeRO-2 or lower")


def _check_site_worker(config: Config, i: int, problems: list[str], *,
                       check_files: bool) -> None:
    """A site's own worker settings, checked as the run's are; only the keys it sets are
    reported under its name (the run's own are reported as worker.*)."""
    site = config.sites[i]
    own, prefix = site.worker.set(), f"sites[{i}].worker"
    if not own:
        return
    found: list[str] = []
    _check_worker(config.worker_for(site.name), found, check_files=check_files, prefix=prefix)
    problems += [p for p in found if p.split(":")[0].removeprefix(prefix + ".") in own]


def _check_merge(config: Config, problems: list[str]) -> None:
    need, m = _need(problems), config.merge
    need(1 <= m.min_workers <= len(config.sites), "merge.min_workers",
         f"must be between 1 and the number of sites ({len(config.sites)}), found {m.min_workers}")
    need(m.round_timeout_s > 0, "merge.round_timeout_s", "must be greater than 0")
    need(m.max_norm_ratio > 1, "merge.max_norm_ratio", "must be greater than 1")
    need(m.max_round_attempts >= 1, "merge.max_round_attempts", "must be at least 1")
    need(m.mode in ("sync", "async"), "merge.mode", f"must be 'sync' or 'async', found {m.mode!r}")
    need(m.buffer >= 1, "merge.buffer", "must be at least 1")
    need(m.staleness_exponent >= 0, "merge.staleness_exponent", "must not be negative")
    need(m.max_staleness >= 0, "merge.max_staleness", "must not be negative")
    need(m.downlink == "fp32" or config.model.lora is None, "merge.downlink",
         "applies to full-weight runs: with model.lora the workers receive only the adapter "
         "(the base once); remove merge.downlink or model.lora")
    _check_strategy(m, problems)


def _check_overlaps(config: Config, problems: list[str], *, check_files: bool) -> None:
    """Places that must not overlap: a site read twice, a run writing into a site's data, an
    eval set that a site would train on; and links that lead out of a site's folder."""
    sites = [(f"sites[{i}]", _place(s.path)) for i, s in enumerate(config.sites)]
    for index, (key, place) in enumerate(sites):
        for other_key, other in sites[:index]:
            if _within(place, other) or _within(other, place):
                problems.append(f"{key}.path: overlaps {other_key}.path ({other}); every row "
                                "would be trained by two sites")
        if _within(_place(config.run.dir), place):
            problems.append(f"run.dir: inside {key}.path ({place}); a run never writes into a "
                            "site's data: choose a folder outside it")
        for i, entry in enumerate(config.eval):
            if _within(_place(entry.path), place):
                problems.append(f"eval[{i}].path: inside {key}.path ({place}); held-out data "
                                "would be trained on: move the eval set out of the site's folder")
        if check_files and not is_uri(place) and Path(place).is_dir():
            for link in sorted(Path(place).iterdir()):
                target = link.resolve()
                if link.is_symlink() and not _within(str(target), place):
                    problems.append(f"{key}.path: {link.name} is a symbolic link to {target}, "
                                    "outside the site's folder; copy the file in instead")


def _place(location: str) -> str:
    """A path or URI in a form that compares (absolute, no credentials, no trailing slash)."""
    if is_uri(location):
        return redact(location).split("?", 1)[0].rstrip("/")
    return str(Path(location).expanduser().resolve())


def _within(inner: str, outer: str) -> bool:
    return inner == outer or inner.startswith(outer.rstrip("/") + "/")


def _check_replay(config: Config, problems: list[str]) -> None:
    r = config.replay
    if r.capacity_tokens < 0:
        problems.append("replay.capacity_tokens: must not be negative")
    if r.scope not in ("shared", "site"):
        problems.append(f"replay.scope: must be 'shared' or 'site', found {r.scope!r}")
    if r.balance not in BALANCE_MODES:
        problems.append(f"replay.balance: must be one of {BALANCE_MODES}, found {r.balance!r}")
    if r.age_weight < 0:
        problems.append(f"replay.age_weight: must not be negative, found {r.age_weight}")
    _check_strata(r, problems)
    ratios = [("replay.ratio", r.ratio)]
    if r.target_forgetting is not None:
        ratios.append(("replay.max_ratio", r.max_ratio))
        if r.target_forgetting < 0:
            problems.append("replay.target_forgetting: must not be negative, or null (off)")
        if r.max_ratio < r.ratio:
            problems.append(f"replay.max_ratio: must be at least replay.ratio ({r.ratio}), "
                            f"found {r.max_ratio}")
    for i, step in enumerate(r.schedule):
        if step.from_round < 1:
            problems.append(f"replay.schedule[{i}].from_round: must be at least 1")
        ratios.append((f"replay.schedule[{i}].ratio", step.ratio))
    batches = {("worker.batch_size", config.worker.batch_size)} | {
        (f"sites[{i}].worker.batch_size", s.worker.batch_size)
        for i, s in enumerate(config.sites) if s.worker.batch_size is not None}
    for key, ratio in ratios:
        if not 0.0 <= ratio < 1.0:
            problems.append(f"{key}: must be in [0, 1), found {ratio}")
            continue
        for batch_key, batch in sorted(batches):
            per_batch = round(ratio * batch)
            if ratio and batch >= 1 and not 1 <= per_batch < batch:
                problems.append(
                    f"{key}: {ratio} x {batch_key} {batch} gives {per_batch} replay "
                    "sequence(s) per batch; choose a ratio and batch size that leave at "
                    "least one replay and one new sequence per batch")


def _check_strata(r: ReplayConfig, problems: list[str]) -> None:
    if r.strata not in STRATA_KINDS:
        problems.append(f"replay.strata: must be one of {STRATA_KINDS}, found {r.strata!r}")
    for name, patterns in r.groups.items():
        if not patterns or not all(isinstance(p, str) and "/" in p for p in patterns):
            problems.append(f"replay.groups.{name}: must list file patterns like "
                            "'site_name/1790s*.parquet'")
    if r.balance == "mix" and (not r.mix or any(w < 0 for w in r.mix.values())
                               or sum(r.mix.values()) <= 0):
        problems.append("replay.mix: balance 'mix' needs a share (>= 0, some > 0) per stratum, "
                        "e.g. {speeches/1790s.parquet: 2, old_eras: 1}")


def _check_strategy(m: MergeConfig, problems: list[str]) -> None:
    checks = [
        (m.strategy in STRATEGIES, "merge.strategy",
         f"must be one of {STRATEGIES}, found {m.strategy!r}"),
        (m.outer_lr is None or m.outer_lr > 0, "merge.outer_lr", "must be greater than 0"),
        (0.0 <= m.outer_momentum < 1.0, "merge.outer_momentum", "must be in [0, 1)"),
        (len(m.adam_betas) == 2 and all(0.0 <= b < 1.0 for b in m.adam_betas),
         "merge.adam_betas", f"must be two numbers in [0, 1), found {m.adam_betas}"),
        (m.adam_eps > 0, "merge.adam_eps", "must be greater than 0"),
        (0.0 <= m.trim_fraction < 0.5, "merge.trim_fraction", "must be in [0, 0.5)"),
        (m.reducers >= 0, "merge.reducers", f"must be 0 (off) or more, found {m.reducers}"),
        (m.compression in COMPRESSIONS, "merge.compression",
         f"must be one of {COMPRESSIONS}, found {m.compression!r}"),
        (m.downlink in COMPRESSIONS, "merge.downlink",
         f"must be one of {COMPRESSIONS}, found {m.downlink!r}"),
        (m.downlink_keep >= 1, "merge.downlink_keep", "must be at least 1"),
    ]
    problems.extend(f"{key}: {message}" for ok, key, message in checks if not ok)


def _check_training(w: WorkerConfig, problems: list[str]) -> None:
    s, e = w.lr_schedule, w.early_stopping
    checks = [
        (s.kind in SCHEDULE_KINDS, "worker.lr_schedule.kind",
         f"must be one of {SCHEDULE_KINDS}, found {s.kind!r}"),
        (s.warmup_steps >= 0, "worker.lr_schedule.warmup_steps", "must not be negative"),
        (s.decay_steps >= 1, "worker.lr_schedule.decay_steps", "must be at least 1"),
        (0.0 <= s.min_lr_ratio <= 1.0, "worker.lr_schedule.min_lr_ratio", "must be in [0, 1]"),
        (w.prox_mu >= 0, "worker.prox_mu", "must not be negative"),
        (e.max_epochs >= 1, "worker.early_stopping.max_epochs", "must be at least 1"),
        (0.0 <= e.holdout_fraction <= 0.5, "worker.early_stopping.holdout_fraction",
         "must be in [0, 0.5]"),
        (e.patience >= 0, "worker.early_stopping.patience", "must not be negative"),
    ]
    problems.extend(f"{key}: {message}" for ok, key, message in checks if not ok)


def _exists(location: str) -> bool:
    """A local path, or a URI whose filesystem answers (a cloud we cannot reach says no)."""
    if not is_uri(location):
        return Path(location).exists()
    try:
        filesystem, path = locate(location)
        return filesystem.get_file_info(path).type != pafs.FileType.NotFound
    except (OSError, ValueError, pa.ArrowException):
        return False


def _check_lora(lora: LoraSpec | None, problems: list[str]) -> None:
    if lora is None:
        return
    checks = [(lora.r >= 1, "model.lora.r", f"must be at least 1, found {lora.r}"),
              (lora.alpha > 0, "model.lora.alpha", "must be greater than 0"),
              (0 <= lora.dropout < 1, "model.lora.dropout", "must be in [0, 1)"),
              (bool(lora.target_modules), "model.lora.target_modules",
               "must name at least one module, e.g. [q_proj, v_proj]")]
    problems.extend(f"{key}: {message}" for ok, key, message in checks if not ok)


def _check_model(model: ModelConfig, problems: list[str]) -> None:
    folder = Path(model.source)
    if model.source not in BUILTIN_MODELS and not (folder / "config.json").is_file():
        problems.append(
            f"model.source: {model.source!r} is neither one of {BUILTIN_MODELS} nor a folder "
            "holding a Hugging Face config.json")
    elif model.source not in BUILTIN_MODELS and not any(folder.glob("*.safetensors")):
        problems.append(
            f"model.source: {model.source} has no .safetensors weights; Tributary never loads "
            "pickle checkpoints (.bin/.pt). Convert it: load it once in a trusted process and "
            "save_pretrained(..., safe_serialization=True)")
    if model.source == "random" and not model.architecture:
        problems.append("model.architecture: required when model.source is 'random'")
    if model.tokenizer is not None and model.tokenizer not in BUILTIN_TOKENIZERS \
            and not Path(model.tokenizer).is_dir():
        problems.append(
            f"model.tokenizer: {model.tokenizer!r} is neither one of {BUILTIN_TOKENIZERS} "
            "nor a tokenizer folder")
    if model.tokenizer is None and model.source not in BUILTIN_MODELS and folder.is_dir() \
            and not any((folder / f).is_file() for f in TOKENIZER_FILES):
        problems.append(
            f"model.source: {model.source} holds no tokenizer (none of {TOKENIZER_FILES}); "
            "name one in model.tokenizer (smollm2, gpt2 or a tokenizer folder)")


def _safe_name(name: str) -> bool:
    return bool(name) and all(c.isalnum() or c in "-_" for c in name)


def resolve_paths(config: Config) -> Config:
    """Make every path absolute, so actors on other processes read the same files."""

    def absolute(path: str) -> str:
        return path if is_uri(path) else str(Path(path).expanduser().resolve())

    sites = [dataclasses.replace(s, path=absolute(s.path)) for s in config.sites]
    sites = [dataclasses.replace(s, worker=dataclasses.replace(
        s.worker, deepspeed=absolute(s.worker.deepspeed))) if isinstance(s.worker.deepspeed, str)
        else s for s in sites]
    evals = [dataclasses.replace(e, path=absolute(e.path)) for e in config.eval]
    worker = config.worker
    if isinstance(worker.deepspeed, str):
        worker = dataclasses.replace(worker, deepspeed=absolute(worker.deepspeed))
    model = config.model
    if model.source not in BUILTIN_MODELS:
        model = dataclasses.replace(model, source=absolute(model.source))
    if model.tokenizer is not None and model.tokenizer not in BUILTIN_TOKENIZERS:
        model = dataclasses.replace(model, tokenizer=absolute(model.tokenizer))
    run = dataclasses.replace(config.run, dir=absolute(config.run.dir))
    return dataclasses.replace(
        config, run=run, sites=sites, eval=evals, worker=worker, model=model)


def with_dtype(ds: dict, dtype: str | None) -> dict:
    """The DeepSpeed config with model.dtype's mixed precision switched on (fp32: none)."""
    if dtype in (None, "fp32"):
        return ds
    key = "bf16" if dtype == "bf16" else "fp16"
    return {**ds, key: {**(ds.get(key) or {}), "enabled": True}}


def deepspeed_dict(worker: WorkerConfig) -> dict:
    """The DeepSpeed config as a dict, read from its JSON file if given as a path."""
    if worker.deepspeed is None:
        return dict(DEFAULT_DEEPSPEED)
    if isinstance(worker.deepspeed, dict):
        return dict(worker.deepspeed)
    try:
        return json.loads(Path(worker.deepspeed).read_text())
    except json.JSONDecodeError as exc:
        problem = f"worker.deepspeed: {worker.deepspeed} is not valid JSON: {exc}"
        raise ConfigError([problem]) from exc


def dump_config(config: Config, path: Path) -> None:
    path.write_text(config_text(config))


def config_text(config: Config) -> str:
    """The config as YAML, with credentials taken out of every URI (they reach a run through
    its environment, never through a file or a job field)."""
    return yaml.safe_dump(_redacted(config.to_dict()), sort_keys=False)


def credential_keys(config: Config) -> list[str]:
    """Dotted keys whose value is a URI holding credentials."""
    return [key for key, value in _uri_values(config.to_dict(), "") if redact(value) != value]


def _uri_values(node: Any, prefix: str) -> list[tuple[str, str]]:
    if isinstance(node, dict):
        return [kv for k, v in node.items() for kv in _uri_values(v, _join(prefix, k))]
    if isinstance(node, list):
        return [kv for i, v in enumerate(node) for kv in _uri_values(v, f"{prefix}[{i}]")]
    return [(prefix, node)] if isinstance(node, str) and is_uri(node) else []


def _redacted(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: _redacted(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_redacted(v) for v in node]
    return redact(node) if isinstance(node, str) else node
