"""What a version says about itself (`manifest.json`) and the round that made it (a line of
`metrics.jsonl`): typed values, serialised in one place."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from trainer.checkpoint import version_name
from trainer.evaluate import EvalResult
from trainer.quality import forgetting, perplexities, transfer
from trainer.state import RoundResult, RunState
from workers.increments import FORMATS
from workers.storage import base_name, join, redact
from workers.types import SiteConfig, WorkerUpdate


@dataclass(frozen=True)
class Timing:
    """How the round went, beside what the manifest holds."""

    merge_seconds: float = 0.0
    round_seconds: float = 0.0
    replay_ratio: float | None = None  # the replay share of each batch it trained with
    # merge.mode async, per site since the run (or resume) began: merged updates per
    # minute, and seconds with no task in flight.
    updates_per_min: Mapping[str, float] = field(default_factory=dict)
    idle_seconds: Mapping[str, float] = field(default_factory=dict)
    # Where the coordinator's time in the round went (seconds): broadcast, previous_version
    # (waiting for the one written in the background), gather, validate, merge, evaluate
    # (in the loop), commit.
    parts: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Manifest:
    """A version's lineage (which rows of which files, by which site, merged how), its
    evaluation, and the run state a resume continues from."""

    parent: str | None
    status: str  # "accepted" or "rejected" (by the quality gate)
    gate: list[str]
    round: int
    increments: dict[str, list[dict]]  # site -> [{file, start_row, end_row[, tokens]}]
    # Rows a rejected candidate trained that are retried (not consumed): same form.
    retried: dict[str, list[dict]]
    # Every update merged into this version: site, the version it trained from, how many
    # versions were published since (staleness), its weight's discount, weight and rows.
    lineage: list[dict]
    tokens: dict[str, dict[str, int]]  # site -> {new, replay}
    merge_weights: dict[str, float]
    eval: dict[str, dict[str, float]]
    forgetting: dict[str, float]
    transfer: dict[str, float | None]
    failures: dict[str, str]
    rejected: dict[str, str]
    unavailable: dict[str, str]
    quarantined: list[dict]
    cursors: dict[str, dict]
    skipped: dict[str, list[str]]
    exhausted: list[str]
    down: list[str]
    down_reasons: dict[str, str]
    replay: str  # the replay snapshot's folder, relative to the run dir
    control: dict  # the replay/lr steering after this version (trainer/control.py)
    sequence: dict[str, int]  # merge.mode async: each site's count of tasks merged
    seed: int

    @classmethod
    def of(cls, *, number: int, evals: Mapping[str, EvalResult], result: RoundResult,
           state: RunState, gate: Sequence[str], history: Sequence[Mapping[str, EvalResult]],
           sites: Sequence[SiteConfig], newest: Sequence[str], seed: int,
           consumed: bool = True, lineage: Sequence[Mapping] | None = None) -> Manifest:
        by_name = {s.name: s for s in sites}
        total = sum(u.weight for u in result.updates) or 1.0
        parent = version_name(state.accepted) if number > 0 else None
        # How each update came to be merged (merge.mode async: its base version, staleness
        # and discount); a synchronous round's updates all trained from the parent.
        extras = lineage if lineage is not None else [
            {"base": parent, "staleness": 0, "discount": 1.0}] * len(result.updates)
        entries, rows, tokens, weights = [], {}, {}, {}
        for u, extra in zip(result.updates, extras, strict=True):
            # A site may have more than one update in a version (merge.mode async).
            mine = [dict(r.to_dict(), file=file_path(by_name[u.worker_id], r.file))
                    for r in u.consumed]
            entries.append({"site": u.worker_id, **extra, "weight": u.weight / total,
                            "rows": mine})
            rows.setdefault(u.worker_id, []).extend(mine)
            counted = tokens.setdefault(u.worker_id, {"new": 0, "replay": 0})
            counted["new"] += u.metrics["new_tokens"]
            counted["replay"] += u.metrics["replay_tokens"]
            weights[u.worker_id] = weights.get(u.worker_id, 0.0) + u.weight / total
        return cls(
            parent=parent,
            status="rejected" if gate else "accepted", gate=list(gate), round=state.round,
            increments=rows if consumed else {}, retried={} if consumed else rows,
            lineage=entries,
            tokens=tokens, merge_weights=weights,
            eval={name: result.to_dict() for name, result in evals.items()},
            forgetting=forgetting([perplexities(h) for h in history], perplexities(evals)),
            transfer=transfer(perplexities(history[0] if history else evals),
                              perplexities(evals), newest=newest),
            failures=result.failures, rejected=result.rejected,
            unavailable=result.unavailable, quarantined=result.quarantined,
            cursors={name: c.to_dict() for name, c in state.cursors.items()},
            skipped={name: sorted(files) for name, files in sorted(state.skipped.items())},
            exhausted=sorted(state.exhausted), down=sorted(state.down),
            down_reasons=dict(sorted(state.down_reasons.items())),
            replay=f"replay/{version_name(number)}", control=state.control.to_dict(),
            sequence=dict(sorted(state.sequence.items())), seed=seed)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class RoundRecord:
    """One line of metrics.jsonl: the round as the table, the plots and Grafana show it."""

    round: int
    version: str
    time: float
    workers_ok: int
    workers_failed: int
    workers_idle: list[str]
    failures: dict[str, str]
    rejected: dict[str, str]
    quarantined: list[dict]
    unavailable: dict[str, str]
    status: str
    gate: list[str]
    eval_perplexity: dict[str, float]
    eval_stderr: dict[str, float]
    forgetting: dict[str, float]
    backward_transfer: float | None
    newest_gain: float | None
    merge_weights: dict[str, float]
    staleness: dict[str, list[int]]  # site -> staleness of each of its updates in the version
    updates_per_min: dict[str, float]
    idle_seconds: dict[str, float]
    replay_ratio: float | None
    replay_control: dict  # the steering in force after this round: ratio, weights, lr, why
    nodes: dict[str, str | None]
    per_site: dict[str, dict]  # metric -> {site: value}, flattened into the line
    merge_seconds: float
    round_seconds: float
    overhead_seconds: float
    round_parts: dict[str, float]

    @classmethod
    def of(cls, *, number: int, manifest: Manifest, result: RoundResult, timing: Timing,
           nodes: Mapping[str, str | None]) -> RoundRecord:
        by_site = site_metrics(result.updates)
        slowest = max([m["train_seconds"] for m in by_site.values()] + [0.0])
        return cls(
            round=manifest.round, version=version_name(number), time=time.time(),
            workers_ok=len(result.updates),
            workers_failed=len(result.failures) + len(result.rejected),
            workers_idle=result.idle, failures=result.failures, rejected=result.rejected,
            quarantined=result.quarantined, unavailable=result.unavailable,
            status=manifest.status, gate=manifest.gate,
            eval_perplexity={k: v["perplexity"] for k, v in manifest.eval.items()},
            eval_stderr={k: v["stderr"] for k, v in manifest.eval.items()},
            forgetting=manifest.forgetting,
            backward_transfer=manifest.transfer["backward_transfer"],
            newest_gain=manifest.transfer["newest_gain"],
            merge_weights=manifest.merge_weights,
            staleness={site: [e["staleness"] for e in manifest.lineage if e["site"] == site]
                       for site in {e["site"] for e in manifest.lineage}},
            updates_per_min=dict(timing.updates_per_min),
            idle_seconds=dict(timing.idle_seconds),
            replay_ratio=timing.replay_ratio,
            replay_control=manifest.control,
            nodes={s: nodes.get(s) for s in by_site},
            per_site={key: {s: m.get(name, default) for s, m in by_site.items()}
                      for key, name, default in PER_SITE},
            merge_seconds=timing.merge_seconds, round_seconds=timing.round_seconds,
            # Time outside training: the round's wall time past its slowest worker's steps.
            overhead_seconds=timing.round_seconds - slowest if timing.round_seconds else 0.0,
            round_parts={k: round(v, 4) for k, v in timing.parts.items()})

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        return {**data.pop("per_site"), **data}


# (key in metrics.jsonl, the worker's metric, default): each a {site: value} mapping.
PER_SITE = [("new_tokens", "new_tokens", 0), ("replay_tokens", "replay_tokens", 0),
            ("train_loss", "loss", None), ("steps", "steps", 0),
            ("tokens_per_s", "tokens_per_s", 0.0), ("bytes_sent", "bytes_sent", 0),
            ("bytes_received", "bytes_received", 0), ("train_seconds", "train_seconds", 0.0),
            ("epochs", "epochs", None), ("holdout_loss", "holdout_loss", None),
            ("lr", "lr", None), ("read_seconds", "read_seconds", 0.0),
            ("load_seconds", "load_seconds", 0.0), ("delta_seconds", "delta_seconds", 0.0)]


def site_metrics(updates: Sequence[WorkerUpdate]) -> dict[str, dict]:
    """Each site's worker metrics for the version: a site with several updates in it
    (merge.mode async) counts their tokens, steps, bytes and seconds together; the rest
    (loss, rates, the lr schedule) are its newest update's."""
    by_site: dict[str, dict] = {}
    for update in updates:
        seen = by_site.get(update.worker_id)
        by_site[update.worker_id] = dict(update.metrics) if seen is None else {
            **update.metrics, **{k: seen.get(k, 0) + update.metrics.get(k, 0) for k in SUMMED}}
    return by_site


SUMMED = ("new_tokens", "replay_tokens", "steps", "bytes_sent", "bytes_received",
          "train_seconds", "read_seconds", "load_seconds", "delta_seconds")


def file_path(site: SiteConfig, name: str) -> str:
    """The manifest's name for a file of the site: its path or URI without credentials (the
    site's path itself when the site is that one file)."""
    base = redact(site.path)
    if base_name(base) == name and "." + name.rsplit(".", 1)[-1] in FORMATS:
        return base
    return join(base, name)
