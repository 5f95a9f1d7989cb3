"""The coordinator's round loop: plan → broadcast → collect → validate → merge → evaluate →
checkpoint, as in ARCHITECTURE.md. Everything a resume needs (weights, cursors, replay, RNG
seeds) is in the newest version's manifest and the files it names."""

from __future__ import annotations

import copy
import dataclasses
import logging
import shutil
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import ray
import torch
from tqdm import tqdm

from cluster.connect import connect
from cluster.remote import RemoteMethod
from trainer import checkpoint
from trainer.config import Config, credential_keys, deepspeed_dict, dump_config
from trainer.evaluate import load_eval_set, perplexity
from trainer.faults import kill_point
from trainer.metrics import MetricsLog
from trainer.mirror import Mirror, staging_dir
from trainer.model_source import load_tokenizer, run_model
from trainer.placement import infeasible, wait_until_placed, waiting_reason, worker_demand
from trainer.quality import forgetting, gate_problems, transfer
from trainer.reduce import ShardedMerge
from trainer.sites import SiteWorkers, all_names, start_site, wait_for_name
from trainer.strategies import build_strategy
from trainer.table import RoundTable
from trainer.threads import Background, StopSignal
from trainer.validate import report_problem, validate_updates
from workers.compression import unpack_delta
from workers.increments import FORMATS
from workers.lora import is_adapter, is_trained
from workers.replay import ReplayPolicy, ReplayStore
from workers.storage import base_name, is_uri, join, list_files, redact
from workers.types import Cursor, GroupSpec, NoData, SiteSpec, TrainSpec, WorkerUpdate
from workers.worker import Worker, new_token_budget

log = logging.getLogger(__name__)


class RunError(RuntimeError):
    """The run cannot go on; the message says why and what to do."""


@dataclass
class RunState:
    """What carries from one round to the next (and across a resume)."""

    round: int = 0
    version: int = 0  # the newest version number used (accepted or rejected)
    accepted: int = 0  # the newest accepted version: the global model
    cursors: dict[str, Cursor] = field(default_factory=dict)
    exhausted: set[str] = field(default_factory=set)  # no rows left
    down: set[str] = field(default_factory=set)  # failed too many rounds in a row
    missed: dict[str, int] = field(default_factory=dict)  # rounds failed in a row, per site
    skipped: dict[str, set[str]] = field(default_factory=dict)  # site -> damaged file names
    down_reasons: dict[str, str] = field(default_factory=dict)  # why a site is left out


@dataclass(frozen=True)
class RoundResult:
    updates: list[WorkerUpdate]  # accepted for merging
    failures: dict[str, str]  # site -> why no update came (dead actor, error, deadline)
    idle: list[str]  # sites with no rows left
    rejected: dict[str, str] = field(default_factory=dict)  # site -> why its update was refused
    quarantined: list[dict] = field(default_factory=list)  # damaged files found (skipped)
    unavailable: dict[str, str] = field(default_factory=dict)  # site -> storage fault (sat out)


class Coordinator:
    def __init__(self, config: Config, *, resume: bool = False,
                 worker_cls: type = Worker, mirror: Mirror | None = None) -> None:
        self.config = config
        self.mirror = mirror  # run.dir is a URI: versions are published there
        self.worker_cls = worker_cls  # the chaos tests pass a Worker subclass that misbehaves
        self.run_dir = Path(config.run.dir)
        self.tokenizer = load_tokenizer(config.model.tokenizer)
        self.state = RunState(cursors={s.name: Cursor() for s in config.sites})
        self.actors: dict[str, SiteWorkers] = {}
        self.followers: dict[str, list] = {}  # site -> this round's refs of ranks 1..N-1
        self.resume = resume
        self.history: list[dict[str, float]] = []  # eval results of the accepted versions
        self.replay = ray.remote(ReplayStore).options(num_cpus=0).remote(
            capacity_per_site=self._replay_capacity(), seed=config.run.seed,
            policy=replay_policy(config))
        if resume:
            self.model = self._load_resume_point()
        else:
            self.model = run_model(config.model, tokenizer=self.tokenizer,
                                          seed=config.run.seed)
        # What the run federates: every weight, or with LoRA the adapters' B (A is frozen).
        self.lora = config.model.lora is not None
        self.global_weights = {n: p.data for n, p in self.model.named_parameters()
                               if not self.lora or is_trained(n)}
        self.base_ref = None  # LoRA: the frozen weights, put in the object store once
        self.strategy = strategy_from(config)
        self.sharded = (ShardedMerge(shapes={n: tuple(t.shape) for n, t in
                                             self.global_weights.items()},
                                     count=config.merge.reducers, strategy=config.merge.strategy,
                                     trim_fraction=config.merge.trim_fraction)
                        if config.merge.reducers else None)
        self.parts: dict[str, list] = {}  # site -> its delta's slices (sharded merging)
        self.publishing: Background | None = None  # a version being written (run.overlap)
        self.waiting = False  # an idle watched run has said that it waits
        self.placement: dict[str, dict] = {}  # site -> where its worker runs (host, node, pid)
        if resume:
            self.strategy.load_state_dict(
                checkpoint.load_outer_state(checkpoint.latest_version(self.run_dir)))
        self.protected = {e.name: e.gate_against for e in config.eval if e.protected}
        self.eval_sets = [load_eval_set(e, tokenizer=self.tokenizer, seq_len=config.worker.seq_len)
                          for e in config.eval]
        self.metrics = MetricsLog(self.run_dir)
        self.table = RoundTable(sites=[s.name for s in config.sites],
                                eval_sets=[e.name for e in config.eval])

    # ------------------------------------------------------------------ the loop

    def run(self) -> Path:
        print(self.table.header())
        if not self.resume:
            self._publish(0, self._evaluate(), RoundResult([], {}, []), overlap=False)
        self._start_workers()
        attempts = 0
        try:
            with StopSignal() as stop:
                while not stop.requested and not self._done():
                    if not self._active_sites():
                        if not self._watching():
                            print(f"No site has rows left (or is up) after round "
                                  f"{self.state.round}; stopping.")
                            break
                        stop.wait(self.config.run.poll_s)
                        continue
                    outcome = self.run_round(self.state.round + 1)
                    if outcome == "idle":  # watched sites, nothing new yet: look again later
                        self._say_waiting()
                        stop.wait(self.config.run.poll_s)
                        continue
                    self.waiting = False
                    attempts = 0 if outcome == "merged" else attempts + 1
                    if attempts >= self.config.merge.max_round_attempts:
                        raise RunError(
                            f"round {self.state.round + 1} failed {attempts} times (see the log "
                            f"for each reason); the last complete version is kept. Fix the "
                            f"cause and run `tributary resume {self.run_dir}`.")
                if stop.requested:
                    print(f"Stopped by {stop.requested} after round {self.state.round}; "
                          f"`tributary resume {self._user_run_dir()}` carries on.")
        finally:  # a version being written in the background is finished, never abandoned
            self._wait_for_publishing()
        return checkpoint.latest_version(self.run_dir)

    def _say_waiting(self) -> None:
        """One line when an idle watched run starts waiting, not one every poll."""
        if not self.waiting:
            print(f"No new data at any site after round {self.state.round}; waiting for new "
                  f"increments (looking every run.poll_s={self.config.run.poll_s:g} s).",
                  flush=True)
        self.waiting = True

    def _done(self) -> bool:
        return self.config.rounds is not None and self.state.round >= self.config.rounds

    def _watching(self) -> bool:
        """Does a watched site that is still up remain (new files may come)?"""
        return any(s.watch and s.name not in self.state.down for s in self.config.sites)

    def _user_run_dir(self) -> str:
        return redact(self.mirror.uri) if self.mirror is not None else str(self.run_dir)

    def run_round(self, round_index: int) -> str:
        """One round: "merged"; "failed" if it gathered too few valid updates, or "idle" if
        every site answered that it has nothing new (nothing is committed then either).
        With run.overlap the previous version is evaluated and written while this round
        trains; it is finished before this round's merge touches the weights."""
        started = time.perf_counter()
        # disable=None: no bar where output is not a terminal (a Ray job's log).
        bar = tqdm(total=len(self.config.sites) + 1, desc=f"round {round_index}", leave=False,
                   disable=None)
        weights_ref = ray.put(self._broadcast())
        self.parts = {}
        result = self._validate(self._collect(round_index, weights_ref, bar),
                                round_index=round_index)
        self._count_misses(result)
        if not (result.updates or result.failures or result.rejected or result.unavailable):
            bar.close()
            return "idle"
        # Sites that sat the round out (watched, nothing new) do not count towards the quorum.
        answering = len([s for s in self._active_sites() if s not in result.idle])
        needed = max(1, min(self.config.merge.min_workers, answering))
        if len(result.updates) < needed:
            bar.close()
            self._round_failed(round_index, result)
            return "failed"
        # The gate may keep the last accepted weights and outer state: hold a copy while the
        # candidate is judged.
        previous = ({k: v.clone() for k, v in self.global_weights.items()}
                    if self.protected else None)
        previous_outer = ({k: v.clone() for k, v in self.strategy.state_dict().items()}
                          if self.protected else None)
        merge_started = time.perf_counter()
        self._merge([u for u in result.updates if u.weight > 0])
        merge_seconds = time.perf_counter() - merge_started
        self.parts = {}  # the slices may leave the object store now
        # The gate decides what the next round trains on, so a gated run evaluates now;
        # otherwise evaluation waits for the background (run.overlap).
        evals = self._evaluate() if self.protected or not self.config.run.overlap else None
        gate = gate_problems(evals, self.history, protected=self.protected,
                             max_regression=self.config.quality.max_regression) if evals else []
        self.state.round = round_index
        self._advance_cursors(result)  # a rejected candidate still consumed its rows
        if not gate:
            self._commit_workers(round_index, result)
            self._remember(result.updates, round_index=round_index)
        kill_point("merged", round_index)
        bar.update(1)
        bar.close()
        self._publish(self.state.version + 1, evals, result, gate=gate,
                      merge_seconds=merge_seconds, round_seconds=time.perf_counter() - started,
                      overlap=self.config.run.overlap and not gate)
        if gate:  # keep the global model at the last accepted version
            log.warning("round %d: candidate v%04d rejected by the quality gate: %s",
                        round_index, self.state.version, "; ".join(gate))
            for name, tensor in self.global_weights.items():
                tensor.copy_(previous[name])
            self.strategy.load_state_dict(previous_outer)
        return "merged"

    # ------------------------------------------------------------------ steps of a round

    def _broadcast(self) -> dict:
        """This round's weights for the workers: all of them, or the LoRA adapters (A and B)."""
        if not self.lora:
            return {n: t.numpy() for n, t in self.global_weights.items()}
        return {n: p.data.numpy() for n, p in self.model.named_parameters() if is_adapter(n)}

    def _base_ref(self):
        """The frozen base weights, in the object store once for the whole run."""
        if self.base_ref is None:
            self.base_ref = ray.put({n: p.data.numpy() for n, p in self.model.named_parameters()
                                     if not is_adapter(n)})
        return self.base_ref

    def _collect(self, round_index: int, weights_ref, bar: tqdm) -> RoundResult:
        """Ask every site with data left to train; wait until all answer or the deadline."""
        pending, failures = self._dispatch(round_index, weights_ref, bar)
        self._wait_for_publishing()  # the previous version, written while these train
        kill_point("training", round_index)
        return self._gather(round_index, pending, failures, bar)

    def _dispatch(self, round_index: int, weights_ref, bar: tqdm) -> tuple[dict, dict]:
        """Start train_round on every active site: ({ref: site}, {site: failure})."""
        pending, failures = {}, {}
        for site in self.config.sites:
            if site.name not in self._active_sites():
                bar.update(1)
                continue
            try:
                workers = self._actor(site.name)
            except Exception as exc:  # noqa: BLE001 - it died while starting or restoring its state
                failures[site.name] = _reason(exc)
                self._drop_actor(site.name)
                bar.update(1)
                continue
            args = {"round_index": round_index, "global_weights": weights_ref,
                    "cursor": self.state.cursors[site.name],
                    "skip": tuple(sorted(self.state.skipped.get(site.name, ())))}
            if self.lora:
                args["base_weights"] = self._base_ref()
            pending[self._train(workers.primary, site.name, **args)] = site.name
            # The other ranks of a multi-worker site train the same round with it.
            self.followers[site.name] = [a.train_round.remote(**args)
                                         for a in workers.actors[1:]]
        return pending, failures

    def _train(self, actor, site: str, **round_args):
        """Start the site's round; with sharded merging its delta comes back as separate
        slices (kept in self.parts) and the returned ref is the update without it."""
        if self.sharded is None:
            return actor.train_round.remote(**round_args)
        shards = self.sharded.shards
        refs = actor.train_round_split.options(num_returns=len(shards) + 1).remote(
            shards=shards, **round_args)
        self.parts[site] = refs[1:]
        return refs[0]

    def _gather(self, round_index: int, pending: dict, failures: dict, bar: tqdm) -> RoundResult:
        updates, idle, quarantined, unavailable = [], [], [], {}
        deadline = time.monotonic() + self.config.merge.round_timeout_s
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1,
                                timeout=max(0.0, deadline - time.monotonic()))
            if not ready:
                break
            site = pending.pop(ready[0])
            bar.update(1)
            try:
                answer = ray.get(ready[0])
                ray.get(self.followers.pop(site, []))  # a group answers once all ranks have
            except Exception as exc:  # noqa: BLE001 - a dead actor or an error inside train_round
                failures[site] = _reason(exc)
                self._drop_actor(site)
                continue
            quarantined.extend(self._note_damaged(site, answer.quarantined))
            if isinstance(answer, NoData) and answer.unavailable:
                unavailable[site] = answer.unavailable
            elif isinstance(answer, NoData):
                idle.append(site)
            elif answer.round == round_index:
                updates.append(dataclasses.replace(answer, delta=unpack_delta(answer.delta)))
        for site in pending.values():  # stragglers: their rows stay unconsumed
            timeout = self.config.merge.round_timeout_s
            failures[site] = f"no update within merge.round_timeout_s={timeout}"
            self._drop_actor(site)
        watched = {s.name for s in self.config.sites if s.watch}
        for site in idle:  # a watched site may get new files: it sits this round out
            if site not in watched:
                self.state.exhausted.add(site)
        return RoundResult(sorted(updates, key=lambda u: u.worker_id), failures, idle,
                           quarantined=quarantined, unavailable=unavailable)

    def _note_damaged(self, site: str, entries: tuple[dict, ...]) -> list[dict]:
        """Record damaged files the site met (RUN_DIR/quarantine/<site>.jsonl) and skip them
        from now on; returns the ones not recorded before. The files stay where they are."""
        known = self.state.skipped.setdefault(site, set())
        fresh = [e for e in entries if e["name"] not in known]
        if fresh:
            folder = self.run_dir / "quarantine"
            folder.mkdir(parents=True, exist_ok=True)
            checkpoint.append_lines(folder / f"{site}.jsonl", fresh)
        known.update(e["name"] for e in fresh)
        return fresh

    def _merge(self, updates: list[WorkerUpdate]) -> None:
        """The strategy's outer step (merge.strategy) on the round's deltas, in place."""
        if self.sharded is not None:
            self.sharded.apply(self.strategy, self.global_weights,
                               {u.worker_id: self.parts[u.worker_id] for u in updates},
                               {u.worker_id: u.weight for u in updates})
            return
        with warnings.catch_warnings():  # object-store arrays are read-only; we only read them
            warnings.simplefilter("ignore", UserWarning)
            deltas = [({k: torch.from_numpy(v) for k, v in u.delta.items()}, u.weight)
                      for u in updates]
            self.strategy.aggregate(self.global_weights, deltas)

    def _remember(self, updates: list[WorkerUpdate], *, round_index: int) -> None:
        """Offer an accepted round's new sequences to the shared replay store."""
        for update in updates:
            if update.sequences.num_rows:  # none with replay.scope: site
                ray.get(self.replay.add.remote(update.worker_id, update.sequences,
                                               round_index=round_index))

    def _evaluate(self) -> dict[str, float]:
        return {data.name: perplexity(self.model, data) for data in self.eval_sets}

    def _advance_cursors(self, result: RoundResult) -> None:
        for update in result.updates:
            self.state.cursors[update.worker_id] = update.cursor

    def _validate(self, result: RoundResult, *, round_index: int) -> RoundResult:
        """Refuse updates whose self-reports do not fit the round's plan, then those whose
        deltas are not finite, have the wrong layout or an outsized norm."""
        bounded, rejected = [], {}
        for update in result.updates:
            problem = self._report_problem(update, round_index=round_index)
            if problem:
                rejected[update.worker_id] = problem
            else:
                bounded.append(update)
        shapes = {name: tuple(t.shape) for name, t in self.global_weights.items()}
        stats = None
        if self.sharded is not None:  # inspected slice by slice on the reducers
            stats = self.sharded.stats({u.worker_id: self.parts[u.worker_id]
                                        for u in bounded if u.weight > 0})
        accepted, refused = validate_updates(
            bounded, shapes=shapes, max_norm_ratio=self.config.merge.max_norm_ratio,
            stats=stats)
        rejected.update(refused)
        for site, reason in rejected.items():
            log.warning("round update of site %s rejected: %s; its rows stay unconsumed",
                        site, reason)
        return dataclasses.replace(result, updates=accepted, rejected=rejected)

    def _report_problem(self, update: WorkerUpdate, *, round_index: int) -> str | None:
        """What a site claims (rows, cursor, tokens, weight) checked against what the
        coordinator planned for it: no site can claim more than its round allowed."""
        site = next(s for s in self.config.sites if s.name == update.worker_id)
        train = self._train_spec()
        return report_problem(
            update, previous=self.state.cursors[site.name],
            budget=new_token_budget(train, round_index=round_index),
            local_steps=train.local_steps, max_epochs=train.early_stopping.max_epochs,
            listed=_listed_names(site.path), shared_sequences=self.config.replay.scope == "shared")

    def _count_misses(self, result: RoundResult) -> None:
        """Track sites that fail round after round; past the limit they are reported and
        left out (until `tributary resume`) instead of being restarted every round."""
        for update in result.updates:
            self.state.missed[update.worker_id] = 0
        for site in [*result.failures, *result.rejected, *result.unavailable]:
            self.state.missed[site] = self.state.missed.get(site, 0) + 1
            if self.state.missed[site] > self.config.worker.max_missed_rounds:
                self.state.down.add(site)
                self._drop_actor(site)
                log.error("site %s failed %d rounds in a row (worker.max_missed_rounds=%d); "
                          "it is left out of this run until `tributary resume`", site,
                          self.state.missed[site], self.config.worker.max_missed_rounds)

    def _commit_workers(self, round_index: int, result: RoundResult) -> None:
        """Accepted workers persist their optimizer state before the version is written, so a
        crash in between resumes from the previous version with that version's state."""
        for update in result.updates:
            try:
                ray.get(self.actors[update.worker_id].call("commit", round_index=round_index))
            except Exception as exc:  # noqa: BLE001 - merged already; only its state is lost
                log.warning("site %s could not save its optimizer state: %s", update.worker_id, exc)
                self._drop_actor(update.worker_id)

    def _round_failed(self, round_index: int, result: RoundResult) -> None:
        reasons = {**result.failures, **result.rejected, **result.unavailable}
        text = "; ".join(f"{site}: {why}" for site, why in reasons.items()) or "no updates"
        log.warning("round %d got %d valid update(s), needs merge.min_workers=%d (%s); "
                    "retrying it", round_index, len(result.updates),
                    self.config.merge.min_workers, text)
        self.metrics.count_failures(reasons)

    def _active_sites(self) -> list[str]:
        gone = self.state.exhausted | self.state.down
        return [s.name for s in self.config.sites if s.name not in gone]

    def _publish(self, number: int, evals: dict[str, float] | None, result: RoundResult, *,
                 overlap: bool, gate: list[str] = (), merge_seconds: float = 0.0,
                 round_seconds: float = 0.0) -> None:
        """Evaluate (if `evals` is None) and write version `number`: now, or with `overlap` on
        a background thread while the next round trains. What it records of the run's state
        is taken now; `latest` moves only once the version is evaluated and written."""
        snapshot = copy.deepcopy(self.state)
        replay_dir = self.run_dir / "replay" / checkpoint.version_name(number)
        replay_saved = self.replay.save.remote(str(replay_dir))  # before later rounds add
        self.state.version = number
        if not gate:
            self.state.accepted = number

        def write() -> None:
            measured = evals if evals is not None else self._evaluate()
            ray.get(replay_saved)
            manifest = self._manifest(number, measured, result, replay_dir, gate=gate,
                                      state=snapshot)
            record = self._record(number, manifest, result, merge_seconds, round_seconds,
                                  round_index=snapshot.round)
            # The metrics line goes first: a crash before the version is published leaves a
            # line that resume drops (rounds past the resumed version), never a version
            # without one.
            self.metrics.write(record)
            checkpoint.save_version(self.run_dir, number=number, model=self.model,
                                    tokenizer=self.tokenizer, manifest=manifest,
                                    rejected=bool(gate), outer_state=self.strategy.state_dict())
            if not gate:
                self.history.append(measured)
            self._prune_replay_snapshots(keep=checkpoint.version_name(number))
            if self.config.run.keep_versions is not None:
                checkpoint.prune_versions(self.run_dir, keep=self.config.run.keep_versions)
            if self.mirror is not None:
                self.mirror.publish(number, rejected=bool(gate), replay_dir=replay_dir)
                self.mirror.prune()
            print(self.table.row(record))

        if overlap:
            self.publishing = Background(write, name=f"publish-{checkpoint.version_name(number)}")
        else:
            write()

    def _wait_for_publishing(self) -> None:
        """Let the version being written in the background finish (its error is raised here)."""
        if self.publishing is not None:
            publishing, self.publishing = self.publishing, None
            publishing.join()

    def _manifest(self, number: int, evals: dict, result: RoundResult, replay_dir: Path, *,
                  gate: list[str], state: RunState) -> dict:
        sites = {s.name: s for s in self.config.sites}
        total = sum(u.weight for u in result.updates) or 1.0
        return {
            "parent": checkpoint.version_name(state.accepted) if number > 0 else None,
            "status": "rejected" if gate else "accepted",
            "gate": list(gate),
            "round": state.round,
            "increments": {u.worker_id: [dict(r.to_dict(), file=_file_path(sites[u.worker_id],
                                                                            r.file))
                                         for r in u.consumed] for u in result.updates},
            "tokens": {u.worker_id: {"new": u.metrics["new_tokens"],
                                     "replay": u.metrics["replay_tokens"]}
                       for u in result.updates},
            "merge_weights": {u.worker_id: u.weight / total for u in result.updates},
            "eval": {name: {"perplexity": value} for name, value in evals.items()},
            "forgetting": forgetting(self.history, evals),
            "transfer": transfer(self.history[0] if self.history else evals, evals,
                                 newest=[e.name for e in self.config.eval if e.newest]),
            "failures": result.failures,
            "rejected": result.rejected,
            "unavailable": result.unavailable,
            "quarantined": result.quarantined,
            "cursors": {name: c.to_dict() for name, c in state.cursors.items()},
            "skipped": {name: sorted(files) for name, files in sorted(state.skipped.items())},
            "exhausted": sorted(state.exhausted),
            "down": sorted(state.down),
            "down_reasons": dict(sorted(state.down_reasons.items())),
            "replay": str(replay_dir.relative_to(self.run_dir)),
            "seed": self.config.run.seed,
        }

    def _record(self, number: int, manifest: dict, result: RoundResult, merge_seconds: float,
                round_seconds: float, *, round_index: int) -> dict:
        by_site = {u.worker_id: u.metrics for u in result.updates}
        return {
            "round": round_index, "version": checkpoint.version_name(number),
            "time": time.time(), "workers_ok": len(result.updates),
            "workers_failed": len(result.failures) + len(result.rejected),
            "workers_idle": result.idle, "failures": result.failures,
            "rejected": result.rejected, "quarantined": result.quarantined,
            "unavailable": result.unavailable,
            "new_tokens": {s: m["new_tokens"] for s, m in by_site.items()},
            "replay_tokens": {s: m["replay_tokens"] for s, m in by_site.items()},
            "train_loss": {s: m["loss"] for s, m in by_site.items()},
            "steps": {s: m["steps"] for s, m in by_site.items()},
            "tokens_per_s": {s: m["tokens_per_s"] for s, m in by_site.items()},
            "bytes_sent": {s: m.get("bytes_sent", 0) for s, m in by_site.items()},
            "bytes_received": {s: m.get("bytes_received", 0) for s, m in by_site.items()},
            "train_seconds": {s: m["train_seconds"] for s, m in by_site.items()},
            "status": manifest["status"], "gate": manifest["gate"],
            "eval_perplexity": {k: v["perplexity"] for k, v in manifest["eval"].items()},
            "forgetting": manifest["forgetting"], **manifest["transfer"],
            "epochs": {s: m.get("epochs") for s, m in by_site.items()},
            "holdout_loss": {s: m.get("holdout_loss") for s, m in by_site.items()},
            "lr": {s: m.get("lr") for s, m in by_site.items()},
            "merge_weights": manifest["merge_weights"],
            "nodes": {s: self.placement.get(s, {}).get("node") for s in by_site},
            "merge_seconds": merge_seconds, "round_seconds": round_seconds,
            # Time outside training: the round's wall time past its slowest worker's steps.
            "overhead_seconds": round_seconds - max(
                [m["train_seconds"] for m in by_site.values()] + [0.0]) if round_seconds else 0.0,
        }

    # ------------------------------------------------------------------ workers

    def _start_workers(self) -> None:
        """Start every site's workers up front. A site the cluster cannot place is reported
        within seconds and left out (the run stops if too few sites remain for
        merge.min_workers); one that fails to start otherwise is retried in the round."""
        starting = {}
        for site in self._active_sites():
            problem = infeasible(self._demand(site))
            if problem:
                self._leave_out(site, problem)
                continue
            try:
                starting[site] = self._actor(site, restore=False)
            except Exception as exc:  # noqa: BLE001 - a group that could not be placed, or any error
                self._leave_out(site, _reason(exc))
        timeout = self.config.cluster.placement_timeout_s
        placed = wait_until_placed({s: w.names for s, w in starting.items()}, timeout_s=timeout)
        for site, ok in placed.items():
            if not ok:
                workers = self._site_config(site).num_workers
                self._leave_out(site, waiting_reason(self._demand(site), workers=workers,
                                                     timeout_s=timeout))
        self._check_quorum()
        for site in [s for s in starting if s not in self.state.down]:
            try:
                answers = ray.get(self.actors[site].call("ready"))
                if self.state.round > 0:
                    ray.get(self.actors[site].call("restore", round_index=self.state.round))
                self.placement[site] = answers[0]
                for answer in answers:
                    log.info("worker of site %s runs on %s", site, answer)
            except Exception as exc:  # noqa: BLE001 - any failure to start is retried
                log.warning("worker of site %s did not start: %s", site, _reason(exc))
                self._drop_actor(site)

    def _leave_out(self, site: str, reason: str) -> None:
        log.error("site %s cannot be placed: %s. It is left out of this run (`tributary "
                  "resume` tries again).", site, reason)
        self._drop_actor(site)
        self.state.down.add(site)
        self.state.down_reasons[site] = reason

    def _check_quorum(self) -> None:
        placeable = [s for s in self.config.sites if s.name not in self.state.down]
        needed = self.config.merge.min_workers
        if len(placeable) < needed:
            reasons = "; ".join(f"{site}: {why}" for site, why in self.state.down_reasons.items())
            raise RunError(f"only {len(placeable)} site(s) can run, merge.min_workers={needed} "
                           f"needs {needed} ({reasons})")

    def _demand(self, site_name: str) -> dict[str, float]:
        w, site = self.config.worker, self._site_config(site_name)
        return worker_demand(num_cpus=w.num_cpus, num_gpus=w.num_gpus, resources=site.resources)

    def _site_config(self, site_name: str):
        return next(s for s in self.config.sites if s.name == site_name)

    def _actor(self, site_name: str, *, restore: bool = True) -> SiteWorkers:
        if site_name in self.actors:
            return self.actors[site_name]
        site = self._site_config(site_name)
        train = self._train_spec()
        folder = self.run_dir / "sites" / site.name

        def kwargs(group: GroupSpec | None) -> dict:
            rank = group.rank if group else 0
            state = "state" if rank == 0 else f"state-rank{rank}"
            remote = (lambda *parts: join(self.mirror.uri, *parts)) if self.mirror else None
            return {
                "site": SiteSpec(site.name, site.path, site.text_column,
                                 settle_s=site.settle_s if site.watch else 0.0),
                "model_config": self.model.config.to_dict(), "tokenizer": self.tokenizer,
                "train": train, "group": group,
                "replay": RemoteMethod(self.replay, "sample")
                if self.config.replay.scope == "shared" else None,
                "state_dir": str(folder / state),
                # run.dir is a URI: committed state is published there.
                "state_uri": remote("sites", site.name, state) if remote else None}

        w = self.config.worker
        workers = start_site(worker_cls=self.worker_cls, site=site.name, size=site.num_workers,
                             num_cpus=w.num_cpus, num_gpus=w.num_gpus, resources=site.resources,
                             make_kwargs=kwargs,
                             ready_timeout_s=self.config.cluster.placement_timeout_s)
        self.actors[site_name] = workers
        if restore and self.state.round > 0:
            ray.get(workers.call("restore", round_index=self.state.round))
        return workers

    def _drop_actor(self, site_name: str) -> None:
        workers = self.actors.pop(site_name, None)
        self.followers.pop(site_name, None)
        if workers is not None:
            workers.kill()

    def shutdown(self) -> None:
        for site in list(self.actors):
            self._drop_actor(site)
        ray.kill(self.replay, no_restart=True)
        if self.sharded is not None:
            self.sharded.shutdown()
        for site in self.config.sites:  # names are released asynchronously; a next run reuses them
            for name in all_names(site.name, site.num_workers):
                try:
                    wait_for_name(name, timeout_s=30)
                except RuntimeError as exc:
                    log.warning("%s", exc)

    # ------------------------------------------------------------------ replay and resume

    def _train_spec(self) -> TrainSpec:
        return train_spec(self.config, local_replay_capacity=self._replay_capacity()
                          if self.config.replay.scope == "site" else 0)

    def _replay_capacity(self) -> int:
        """Sequences each site may hold: replay.capacity_tokens split evenly across sites."""
        return self.config.replay.capacity_tokens // (
            self.config.worker.seq_len * len(self.config.sites))

    def _prune_replay_snapshots(self, *, keep: str) -> None:
        for folder in (self.run_dir / "replay").glob("v[0-9]*"):
            if folder.name < keep:
                shutil.rmtree(folder, ignore_errors=True)

    def _load_resume_point(self) -> torch.nn.Module:
        """Weights from `versions/latest`; cursors, replay and round from the newest complete
        manifest (a version the quality gate rejected still consumed its rows)."""

        latest = checkpoint.latest_version(self.run_dir)
        if latest is None:
            raise RunError(f"{self.run_dir} has no versions/latest; start it with `tributary run`")
        accepted = checkpoint.read_manifest(latest)["version"]
        # An accepted version past `latest` was renamed into place just before a crash: redo it.
        manifests = [m for m in checkpoint.all_manifests(self.run_dir, include_rejected=True)
                     if m.get("status") == "rejected" or m["version"] <= accepted]
        newest = max(manifests, key=lambda m: m["version"])
        self.state = RunState(
            round=newest["round"], version=newest["version"], accepted=accepted,
            cursors={s.name: Cursor.from_dict(newest["cursors"].get(s.name, {}))
                     for s in self.config.sites},
            exhausted=set(newest.get("exhausted", [])),
            skipped={site: set(names) for site, names in newest.get("skipped", {}).items()})
        self.history = [{k: v["perplexity"] for k, v in m["eval"].items()} for m in manifests
                        if m.get("status") != "rejected"]
        model = run_model(self.config.model, tokenizer=self.tokenizer,
                          seed=self.config.run.seed, version_dir=latest)
        ray.get(self.replay.restore.remote(str(self.run_dir / newest["replay"])))
        MetricsLog.drop_after(self.run_dir, round_index=self.state.round)
        log.info("resuming %s at round %d from %s", self.run_dir, self.state.round, latest.name)
        return model


def strategy_from(config: Config):
    m = config.merge
    return build_strategy(m.strategy, lr=m.outer_lr, momentum=m.outer_momentum,
                          nesterov=m.nesterov, betas=m.adam_betas, eps=m.adam_eps,
                          trim_fraction=m.trim_fraction)


def replay_policy(config: Config) -> ReplayPolicy:
    return ReplayPolicy(balance=config.replay.balance, age_weight=config.replay.age_weight)


def train_spec(config: Config, *, local_replay_capacity: int) -> TrainSpec:
    """What every worker of the run is told about training (the same for all sites)."""
    w, r = config.worker, config.replay
    return TrainSpec(
        local_steps=w.local_steps, batch_size=w.batch_size, seq_len=w.seq_len, lr=w.lr,
        weight_decay=w.weight_decay, replay_ratio=r.ratio, deepspeed=deepspeed_dict(w),
        seed=config.run.seed, max_row_chars=w.max_row_chars,
        local_replay_capacity=local_replay_capacity, replay_policy=replay_policy(config),
        replay_schedule=tuple((s.from_round, s.ratio) for s in r.schedule),
        lr_schedule=w.lr_schedule, prox_mu=w.prox_mu, early_stopping=w.early_stopping,
        compression=config.merge.compression, lora=config.model.lora)


def _reason(exc: BaseException) -> str:
    """One line for manifests and logs: the worker's own exception, not Ray's wrapper."""
    if isinstance(exc, ray.exceptions.RayTaskError) and exc.cause is not None:
        exc = exc.cause
    lines = str(exc).strip().splitlines() or [""]
    return f"{type(exc).__name__}: {lines[0][:300]}"


def _file_path(site, name: str) -> str:
    """The manifest's name for a file of the site: its path or URI without credentials (the
    site's path itself when the site is that one file)."""
    base = redact(site.path)
    if base_name(base) == name and PurePosixPath(name).suffix in FORMATS:
        return base
    return join(base, name)


def _listed_names(location: str) -> set[str] | None:
    """The site's file names as the coordinator sees them; None where it cannot list them (a
    folder local to the site's node, storage that is down): that check is then skipped."""
    try:  # one look, no retries: a slow store must not hold the round up
        return {f.name for f in list_files(location, suffixes=set(FORMATS))}
    except (OSError, ValueError):
        return None


def run_training(config: Config, *, resume: bool = False, worker_cls: type = Worker) -> Path:
    """Run (or resume) a whole training run; returns the newest version's folder (the local
    staging copy's, when run.dir is a URI)."""
    config, mirror = _staging(config, resume=resume)
    run_dir = Path(config.run.dir)
    if not resume and (run_dir / "versions").exists():
        raise RunError(f"{run_dir} already holds a run; use `tributary resume {run_dir}` "
                       "or choose another run.dir")
    run_dir.mkdir(parents=True, exist_ok=True)
    for key in credential_keys(config):
        log.warning("%s holds credentials: this run uses them, but they are not written to "
                    "config.yaml, manifests or logs; for `tributary resume`, give them through "
                    "the environment (e.g. AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY)", key)
    dump_config(config if mirror is None else _with_dir(config, mirror.uri),
                run_dir / "config.yaml")
    started = connect(address=config.cluster.address, num_cpus=config.cluster.num_cpus,
                      dashboard_host=config.cluster.dashboard_host,
                      dashboard_port=config.cluster.dashboard_port,
                      include_dashboard=config.cluster.include_dashboard)
    coordinator = None
    try:
        coordinator = Coordinator(config, resume=resume, worker_cls=worker_cls, mirror=mirror)
        return coordinator.run()
    finally:
        if coordinator is not None:
            coordinator.shutdown()
        if started:
            ray.shutdown()


def _staging(config: Config, *, resume: bool) -> tuple[Config, Mirror | None]:
    """A URI run.dir runs in a local staging folder published to the URI (trainer/mirror.py)."""
    if not is_uri(config.run.dir):
        return config, None
    mirror = Mirror(config.run.dir, staging_dir(config.run.dir))
    if resume:
        mirror.pull()
    elif mirror.exists():
        shown = redact(config.run.dir)
        raise RunError(f"{shown} already holds a run; use `tributary resume {shown}` or "
                       "choose another run.dir")
    else:
        shutil.rmtree(mirror.local, ignore_errors=True)  # a stale copy of an earlier attempt
    return _with_dir(config, str(mirror.local)), mirror


def _with_dir(config: Config, run_dir: str) -> Config:
    return dataclasses.replace(config, run=dataclasses.replace(config.run, dir=run_dir))
