"""Per-round metrics: one JSON object per round in metrics.jsonl, and `tributary_*` Ray metrics
(exported by Ray's metrics agent to Prometheus and the Ray dashboard)."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import ray

from workers.fsio import atomic_write

log = logging.getLogger(__name__)

class RayMetrics:
    """The `tributary_*` metrics; every one carries a `run` tag (the run folder's name) so
    several runs on one cluster stay apart in Prometheus and Grafana."""

    def __init__(self, *, run: str) -> None:
        from ray.util.metrics import Counter, Gauge

        def metric(kind, name: str, description: str, *tags: str):
            made = kind(name, description=description, tag_keys=(*tags, "run"))
            made.set_default_tags({"run": run})
            return made

        self.round = metric(Gauge, "tributary_round", "Last completed round")
        self.version = metric(Gauge, "tributary_version", "Newest accepted version")
        self.tokens = metric(Counter, "tributary_tokens_total", "Tokens trained", "site", "kind")
        self.loss = metric(Gauge, "tributary_train_loss", "Mean train loss of the round", "site")
        self.tokens_per_s = metric(Gauge, "tributary_tokens_per_second",
                                   "Worker training throughput", "site")
        self.perplexity = metric(Gauge, "tributary_eval_perplexity", "Held-out perplexity", "set")
        self.forgetting = metric(Gauge, "tributary_forgetting",
                                 "Perplexity now over the best accepted so far, minus 1", "set")
        self.backward_transfer = metric(Gauge, "tributary_backward_transfer",
                                        "Mean relative perplexity gain since v0 of older sets")
        self.newest_gain = metric(Gauge, "tributary_newest_gain",
                                  "Mean relative perplexity gain since v0 of the newest sets")
        self.lr = metric(Gauge, "tributary_learning_rate", "Inner lr at the round's last step",
                         "site")
        self.bytes = metric(Counter, "tributary_bytes_total",
                            "Bytes of weights and deltas moved per worker", "site", "direction")
        self.merge_seconds = metric(Gauge, "tributary_merge_seconds", "Merge time")
        self.replay_ratio = metric(Gauge, "tributary_replay_ratio",
                                   "Replay share of each batch in force (steered by the "
                                   "forgetting budget and the gate)")
        self.lr_scale = metric(Gauge, "tributary_lr_scale",
                               "Peak learning rate's factor in force (lowered after a rejection)")
        self.staleness = metric(Gauge, "tributary_staleness",
                                "Versions published since the newest merged update's base "
                                "(0 in merge.mode sync)", "site")
        self.updates_per_min = metric(Gauge, "tributary_updates_per_minute",
                                      "Merged updates per minute (merge.mode async)", "site")
        self.idle_seconds = metric(Gauge, "tributary_idle_seconds",
                                   "Seconds with no task in flight (merge.mode async)", "site")
        self.overhead_seconds = metric(Gauge, "tributary_round_overhead_seconds",
                                       "Round wall time minus the slowest worker's training")
        self.quarantined = metric(Counter, "tributary_quarantined_files_total",
                                  "Increment files set aside as unreadable")
        self.failures = metric(Counter, "tributary_worker_failures_total",
                               "Failed, late or rejected worker updates", "site")

    def record(self, record: dict) -> None:
        self.round.set(record["round"])
        if record.get("status", "accepted") == "accepted":
            self.version.set(int(record["version"].lstrip("v")))
        for kind in ("new", "replay"):
            for site, count in record.get(f"{kind}_tokens", {}).items():
                if count > 0:  # Ray counters only take positive increments
                    self.tokens.inc(float(count), tags={"site": site, "kind": kind})
        for site, loss in record.get("train_loss", {}).items():
            if loss is not None:
                self.loss.set(loss, tags={"site": site})
        for site, rate in record.get("tokens_per_s", {}).items():
            self.tokens_per_s.set(rate, tags={"site": site})
        for name, value in record.get("eval_perplexity", {}).items():
            self.perplexity.set(value, tags={"set": name})
        for name, value in record.get("forgetting", {}).items():
            self.forgetting.set(value, tags={"set": name})
        for key in ("backward_transfer", "newest_gain"):
            if record.get(key) is not None:
                getattr(self, key).set(record[key])
        for site, lrs in record.get("lr", {}).items():
            if lrs:
                self.lr.set(lrs[-1], tags={"site": site})
        for direction in ("sent", "received"):
            for site, count in record.get(f"bytes_{direction}", {}).items():
                if count > 0:
                    self.bytes.inc(float(count), tags={"site": site, "direction": direction})
        if "merge_seconds" in record:
            self.merge_seconds.set(record["merge_seconds"])
        if record.get("replay_ratio") is not None:
            self.replay_ratio.set(record["replay_ratio"])
        control = record.get("replay_control") or {}
        if "lr_scale" in control:
            self.lr_scale.set(control["lr_scale"])
        for site, values in record.get("staleness", {}).items():
            if values:
                self.staleness.set(float(max(values)), tags={"site": site})
        for key in ("updates_per_min", "idle_seconds"):
            for site, value in record.get(key, {}).items():
                getattr(self, key).set(float(value), tags={"site": site})
        if "overhead_seconds" in record:
            self.overhead_seconds.set(record["overhead_seconds"])
        self.count_failures({**record.get("failures", {}), **record.get("rejected", {})})
        if record.get("quarantined"):
            self.quarantined.inc(float(len(record["quarantined"])))

    def count_failures(self, reasons: dict[str, str]) -> None:
        for site in reasons:
            self.failures.inc(1.0, tags={"site": site})


class MetricsLog:
    """metrics.jsonl plus the Ray metrics, written once per round."""

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / "metrics.jsonl"
        self.ray = RayMetrics(run=run_dir.name) if ray.is_initialized() else None

    def count_failures(self, reasons: dict[str, str]) -> None:
        """Failures of a round that produced no version (so no metrics.jsonl line)."""
        if self.ray is not None:
            self.ray.count_failures(reasons)

    def write(self, record: dict) -> None:
        with open(self.path, "a") as handle:
            handle.write(json.dumps(record) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        if self.ray is not None:
            self.ray.record(record)


    @staticmethod
    def drop_after(run_dir: Path, *, round_index: int) -> None:
        """Drop lines of rounds past `round_index` (written before a crash kept their version)."""
        kept = [r for r in read_metrics(run_dir) if r["round"] <= round_index]
        atomic_write(run_dir / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in kept))


def read_metrics(run_dir: Path) -> list[dict]:
    """The records of metrics.jsonl. A torn last line (a kill or a full disk mid-write) is
    left out with a warning — resume rewrites the file without it; a bad line elsewhere is
    an error naming it."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    records = []
    for number, line in enumerate(lines, start=1):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as exc:
            if number < len(lines):
                raise ValueError(f"{path}: line {number} is not JSON ({exc}); fix or remove "
                                 "that line") from exc
            log.warning("%s: the last line is torn (%s); leaving it out", path, exc)
    return records
