"""The version writer: evaluate (when the loop did not), write a version and its manifest,
its replay snapshot and its metrics line, move `latest`, prune, publish to a URI run dir —
now, or on a background thread while the next round trains (`run.overlap`), with an explicit
`wait` the round loop calls before anything the write must have finished first."""

from __future__ import annotations

import copy
import dataclasses
import logging
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import ray
import torch

from trainer import checkpoint
from trainer.config import Config
from trainer.evaluate import EvalResult
from trainer.manifest import Manifest, RoundRecord, Timing
from trainer.metrics import MetricsLog
from trainer.mirror import Mirror
from trainer.state import RoundResult, RunState
from trainer.table import RoundTable
from trainer.threads import Background
from workers.types import SiteConfig

log = logging.getLogger(__name__)

# A version written while the next round trains yields the CPU to that round: on a node whose
# cores it shares with the workers (Ray starts them at nice 15), an evaluation at nice 0 would
# slow every site's reads and steps. It still finishes, since the loop waits for it.
BACKGROUND_NICENESS = 19


def wait_durable(refs: Sequence, *, version: int) -> None:
    """Wait for the workers' states a version builds on. One that could not be saved is
    reported, not fatal: the run goes on, and only a resume from this version would restart
    that site from its previous state."""
    for ref in refs:
        try:
            ray.get(ref)
        except Exception as exc:  # noqa: BLE001 - a worker that died or a disk that failed
            log.warning("a worker's state for %s was not saved (%s); a resume from it "
                        "restarts that site from its previous state",
                        checkpoint.version_name(version), exc)


class VersionWriter:
    def __init__(self, run_dir: Path, *, model: torch.nn.Module, tokenizer, replay,
                 sites: Sequence[SiteConfig], newest: Sequence[str], seed: int,
                 keep_versions: int | None, mirror: Mirror | None, table: RoundTable,
                 history: list[dict[str, EvalResult]], max_shard_size: str = "5GB") -> None:
        self.run_dir, self.model, self.tokenizer = run_dir, model, tokenizer
        self.max_shard_size = max_shard_size
        self.replay = replay  # the shared replay store actor (its snapshot goes with a version)
        self.sites, self.newest, self.seed = sites, newest, seed
        self.keep_versions, self.mirror, self.table = keep_versions, mirror, table
        self.metrics = MetricsLog(run_dir)
        self.history = history  # eval results of the accepted versions, oldest first
        self.pending: Background | None = None
        self.seconds = 0.0  # how long the last version took to evaluate and write

    @classmethod
    def for_run(cls, config: Config, *, model: torch.nn.Module, tokenizer, replay,
                mirror: Mirror | None, table: RoundTable,
                history: list[dict[str, EvalResult]]) -> VersionWriter:
        return cls(Path(config.run.dir), model=model, tokenizer=tokenizer, replay=replay,
                   sites=config.sites, newest=[e.name for e in config.eval if e.newest],
                   seed=config.run.seed, keep_versions=config.run.keep_versions,
                   mirror=mirror, table=table, history=history,
                   max_shard_size=config.run.max_shard_size)

    def write(self, number: int, *, state: RunState, result: RoundResult,
              evaluate: Callable[[], dict[str, EvalResult]], gate: Sequence[str] = (),
              outer_state: Mapping[str, torch.Tensor] | None = None,
              timing: Timing | None = None, nodes: Mapping[str, str | None] | None = None,
              consumed: bool = True, background: bool = False,
              lineage: Sequence[Mapping] | None = None, weights: bool = True,
              durable: Sequence = ()) -> None:
        """Write version `number`. What it records of the run's state and the replay store is
        taken now; `latest` moves only once it is evaluated and written, and the workers'
        states it builds on are on disk (`durable`: refs from SiteFleet.commit).
        `weights=False` (run.eval_every) writes its manifest and metrics line only: no
        weights, no replay snapshot — a resume goes back to the newest version with both."""
        state = copy.deepcopy(state)
        replay_dir = self.run_dir / "replay" / checkpoint.version_name(number)
        # Taken now, before later rounds add to the store.
        replay_saved = self.replay.save.remote(str(replay_dir)) if weights else None
        outer = {k: v.clone() for k, v in (outer_state or {}).items()}

        def write() -> None:
            started = time.perf_counter()
            evals = evaluate()
            if replay_saved is not None:
                ray.get(replay_saved)
            wait_durable(durable, version=number)
            manifest = Manifest.of(number=number, evals=evals, result=result, state=state,
                                   gate=gate, history=self.history, sites=self.sites,
                                   newest=self.newest, seed=self.seed, consumed=consumed,
                                   lineage=lineage)
            if not weights:
                manifest = dataclasses.replace(manifest, replay="")
            record = RoundRecord.of(number=number, manifest=manifest, result=result,
                                    timing=timing or Timing(), nodes=nodes or {})
            # The metrics line goes first: a crash before the version is published leaves a
            # line that resume drops (rounds past the resumed version), never a version
            # without one.
            self.metrics.write(record.to_dict())
            checkpoint.save_version(self.run_dir, number=number, model=self.model,
                                    tokenizer=self.tokenizer, manifest=manifest.to_dict(),
                                    rejected=bool(gate), outer_state=outer, weights=weights,
                                    max_shard_size=self.max_shard_size)
            if not gate and evals:
                self.history.append(evals)
            if weights:
                self._prune()
            if self.mirror is not None:
                self.mirror.publish(number, rejected=bool(gate), replay_dir=replay_dir)
                self.mirror.prune()
            print(self.table.row(record.to_dict()))
            self.seconds = time.perf_counter() - started

        self.wait()
        if background:
            self.pending = Background(write, name=f"write-{checkpoint.version_name(number)}",
                                      niceness=BACKGROUND_NICENESS)
        else:
            write()

    def wait(self) -> None:
        """Let the version being written in the background finish (its error is raised here)."""
        if self.pending is not None:
            pending, self.pending = self.pending, None
            pending.join()

    def count_failures(self, reasons: Mapping[str, str]) -> None:
        """Failures of a round that produced no version (so no metrics line)."""
        self.metrics.count_failures(dict(reasons))

    def _prune(self) -> None:
        """Replay snapshots go with the versions' weights (run.keep_versions): a retraction
        restarts from before any version still kept."""
        if self.keep_versions is None:
            return
        snapshots = sorted((self.run_dir / "replay").glob("v[0-9]*"),
                           key=checkpoint.version_number)
        for folder in snapshots[:-self.keep_versions]:
            shutil.rmtree(folder, ignore_errors=True)
        checkpoint.prune_versions(self.run_dir, keep=self.keep_versions)
