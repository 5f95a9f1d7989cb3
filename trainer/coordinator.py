"""The coordinator's round loop, as the data flows (ARCHITECTURE.md): plan → broadcast →
collect → propose → evaluate → gate → publish. Each step is owned by one part: the site fleet
(trainer/fleet.py) runs the workers, the merger (trainer/merger.py) validates, combines and
steps, the version writer (trainer/versions.py) writes and publishes. Everything a resume needs
is in the newest version's manifest and the files it names (trainer/resume.py)."""

from __future__ import annotations

import dataclasses
import logging
import shutil
import time
from collections.abc import Mapping
from pathlib import Path

import ray
from tqdm import tqdm

from cluster.connect import connect
from trainer import checkpoint, retract
from trainer.asynchronous import AsyncLoop
from trainer.config import Config, credential_keys, dump_config
from trainer.control import after_gate, budget_step, steered_ratio
from trainer.evaluate import EvalResult, evaluate, load_eval_set
from trainer.faults import kill_point
from trainer.fleet import SiteFleet
from trainer.manifest import Timing
from trainer.merger import Parts, build_merger
from trainer.metrics import MetricsLog
from trainer.mirror import Mirror, staging_dir
from trainer.model_source import load_tokenizer, run_model
from trainer.quality import gate_problems
from trainer.quarantine import note_damaged
from trainer.resume import ResumePoint, resume_point
from trainer.runlock import RunLock
from trainer.state import RoundResult, RunError, RunState
from trainer.table import RoundTable
from trainer.threads import StopSignal
from trainer.validate import listed_names, report_problem
from trainer.versions import VersionWriter
from workers.budget import new_token_budget
from workers.lora import is_adapter, is_trained
from workers.replay import ReplayStore, ratio_at
from workers.storage import is_uri, redact
from workers.types import Cursor, RoundTask, SiteConfig
from workers.worker import Worker

log = logging.getLogger(__name__)
__all__ = ["Coordinator", "RunError", "run_training"]


class Coordinator:
    def __init__(self, config: Config, *, resume: bool = False,
                 worker_cls: type = Worker, mirror: Mirror | None = None,
                 exclude: Mapping[str, set[str]] | None = None) -> None:
        started = time.perf_counter()
        self.config, self.resume, self.mirror = config, resume, mirror
        self.run_dir = Path(config.run.dir)
        self.tokenizer = load_tokenizer(config.model.tokenizer_source())
        self.trains = {s.name: config.train_spec(s.name) for s in config.sites}
        self.replay = ray.remote(ReplayStore).options(num_cpus=0).remote(
            capacity=config.replay_capacity(), seed=config.run.seed,
            policy=config.replay)
        point = resume_point(self.run_dir, sites=config.sites) if resume else None
        self.state = point.state if point else RunState(
            cursors={s.name: Cursor() for s in config.sites})
        for site, names in (exclude or {}).items():  # retracted files: never read again
            self.state.skipped.setdefault(site, set()).update(names)
        self.model = run_model(config.model, tokenizer=self.tokenizer, seed=config.run.seed,
                               version_dir=point.version_dir if point else None)
        # What the run federates: every weight, or with LoRA the adapters' B (A is frozen).
        self.lora = config.model.lora is not None
        self.global_weights = {n: p.data for n, p in self.model.named_parameters()
                               if not self.lora or is_trained(n)}
        self.base_ref = None  # LoRA: the frozen weights, put in the object store once
        self.protected = {e.name: e.gate_against for e in config.eval if e.protected}
        self.covers = {e.name: e.covers for e in config.eval if e.covers is not None}
        # The gate and the forgetting budget steer the next rounds from this one's evaluation.
        self.steered = bool(self.protected) or config.replay.target_forgetting is not None
        # A synchronous gate takes back the last merge; an asynchronous one goes back to the
        # last evaluated version (trainer/asynchronous.py keeps that snapshot itself).
        self.merger = build_merger(config.merge, weights=self.global_weights,
                                   keep_previous=bool(self.protected)
                                   and config.merge.mode == "sync")
        self.eval_sets = [load_eval_set(e, tokenizer=self.tokenizer, seq_len=config.worker.seq_len)
                          for e in config.eval]
        self.table = RoundTable(sites=[s.name for s in config.sites],
                                eval_sets=[e.name for e in config.eval],
                                staleness=config.merge.mode == "async")
        if point:
            self._restore(point)
        self.writer = VersionWriter.for_run(
            config, model=self.model, tokenizer=self.tokenizer, replay=self.replay,
            mirror=mirror, table=self.table, history=point.history if point else [])
        self.fleet = SiteFleet.for_run(config, worker_cls=worker_cls, trains=self.trains,
                                       model=self.model, tokenizer=self.tokenizer,
                                       replay=self.replay, mirror=mirror)
        if self.merger.downlink is not None:  # replaced workers hold no weights to build on
            self.fleet.on_drop.append(self.merger.downlink.forget)
        self.waiting = False  # an idle watched run has said that it waits
        self.saving: list = []  # workers' states being written for the next version
        # Seconds of each step before the first round (run_training adds the Ray start).
        self.startup: dict[str, float] = {"coordinator": time.perf_counter() - started}

    def _restore(self, point: ResumePoint) -> None:
        """The merger's outer state and the replay store as the resumed version left them;
        accepted versions past that point are set aside (their rows are trained again)."""
        superseded = checkpoint.supersede(self.run_dir, after=self.state.version)
        if self.mirror is not None:
            self.mirror.moved(superseded, to=checkpoint.SUPERSEDED)
        self.merger.load_state_dict(checkpoint.load_outer_state(point.version_dir))
        ray.get(self.replay.restore.remote(str(point.replay_dir)))
        MetricsLog.drop_after(self.run_dir, round_index=self.state.round)
        log.info("resuming %s at round %d from %s", self.run_dir, self.state.round,
                 point.version_dir.name)

    # ------------------------------------------------------------------ the loop

    def run(self) -> Path:
        print(self.table.header())
        clock = time.perf_counter()
        if not self.resume:  # evaluated and written while the workers start (run.overlap)
            self.writer.write(0, state=self.state, result=RoundResult([], {}, []),
                              evaluate=self._evaluate, background=self.config.run.overlap)
        try:
            self._start_fleet()
        finally:  # version 0 is there before round 1, or before a failed start is reported
            self.startup["workers"], clock = time.perf_counter() - clock, time.perf_counter()
            self.writer.wait()
        self.startup["first_version_wait"] = time.perf_counter() - clock
        self.startup["first_version"] = self.writer.seconds  # 0.0 on resume: none written
        self._write_timing()
        try:
            with StopSignal() as stop, retract.Pausing(self.run_dir, stop):
                if self.config.merge.mode == "async":
                    AsyncLoop(self).run(stop)
                else:
                    self._loop(stop)
                if stop.requested and stop.requested.startswith("retraction"):
                    print(f"Paused after round {self.state.round} for a {stop.requested}.")
                elif stop.requested:
                    print(f"Stopped by {stop.requested} after round {self.state.round}; "
                          f"`tributary resume {self._user_run_dir()}` carries on.")
        finally:  # a version being written in the background is finished, never abandoned
            clock = time.perf_counter()
            self.writer.wait()
            self._write_timing(finish=time.perf_counter() - clock)
        return checkpoint.latest_version(self.run_dir)

    def _loop(self, stop: StopSignal) -> None:
        attempts = 0
        while not stop.requested and not self._done():
            if not self.state.active(self.config.sites):
                if not self.state.watching(self.config.sites):
                    print(f"No site has rows left (or is up) after round {self.state.round}; "
                          "stopping.")
                    return
                stop.wait(self.config.run.poll_s)
                continue
            outcome = self.run_round(self.state.round + 1)
            if outcome == "idle" and not self.state.active(self.config.sites):
                continue  # that round found every site out of rows: stop now, not a poll later
            if outcome in ("idle", "unavailable"):  # nothing new, or storage down: look later
                self._say_waiting(outcome)
                stop.wait(self.config.run.poll_s)
                continue
            self.waiting = False
            attempts = attempts + 1 if outcome == "failed" else 0
            if attempts >= self.config.merge.max_round_attempts:
                raise RunError(
                    f"round {self.state.round + 1} failed {attempts} times (see the log for "
                    f"each reason); the last complete version is kept. Fix the cause and run "
                    f"`tributary resume {self._user_run_dir()}`.")

    def run_round(self, round_index: int) -> str:
        """One round: "merged", "rejected" (the quality gate kept the previous version),
        "failed" (too few valid updates; it is tried again), "idle" (no site had anything
        new; nothing is committed) or "unavailable" (every site sat out on a storage fault). With run.overlap the previous version is evaluated and
        written while this round trains; the merge waits for it."""
        started = time.perf_counter()
        tasks = self._plan(round_index)
        with tqdm(total=len(tasks) + 1, desc=f"round {round_index}", leave=False,
                  disable=None) as bar:  # disable=None: no bar in a Ray job's log
            result, parts, seconds = self._collect(tasks, on_answer=lambda: bar.update(1))
            if result.quiet or result.stalled:
                return "idle" if result.quiet else "unavailable"
            if not self._quorum(result):
                self._round_failed(round_index, result)
                return "failed"
            merge_seconds = seconds["merge"] = self.merger.propose(result.updates, parts)
            bar.update(1)
        # The gate and the forgetting budget decide what the next round does, so they
        # evaluate now; otherwise evaluation waits for the background (run.overlap).
        evaluate_started = time.perf_counter()
        evals = self._evaluate() if self.steered or not self.config.run.overlap else None
        seconds["evaluate"] = time.perf_counter() - evaluate_started
        q = self.config.quality
        gate = gate_problems(evals, self.writer.history, protected=self.protected,
                             max_regression=q.max_regression, z=q.z()) if evals else []
        consumed = self._steer(round_index, evals, gate)
        commit_started = time.perf_counter()
        self._settle(round_index, result, accepted=not gate, consumed=consumed)
        seconds["commit"] = time.perf_counter() - commit_started
        kill_point("merged", round_index)
        self._publish(result, evals, gate=gate, consumed=consumed, timing=Timing(
            merge_seconds=merge_seconds, round_seconds=time.perf_counter() - started,
            replay_ratio=next(iter(tasks.values())).replay_ratio or ratio_at(
                self.config.replay, round_index=round_index), parts=seconds))
        (self.merger.reject if gate else self.merger.accept)()
        if gate and self.state.control.rejections >= q.max_rejections:
            raise RunError(self._rejections_message(gate))
        return "rejected" if gate else "merged"

    # ------------------------------------------------------------------ steps of a round

    def _plan(self, round_index: int) -> dict[str, RoundTask]:
        """Every active site's task for the round."""
        return {site: self.task(site, index=round_index, schedule=round_index,
                                cursor=self.state.cursors[site])
                for site in self.state.active(self.config.sites)}

    def task(self, site: str, *, index: int, schedule: int, cursor) -> RoundTask:
        """A site's task: where it continues, what it may take, what it skips, and the
        replay and learning-rate steering in force. `index` numbers the site's committed
        states (the round; in merge.mode async the site's own count), `schedule` is the
        round the replay schedule is read at."""
        control, r = self.state.control, self.config.replay
        ratio = steered_ratio(control, base_ratio=ratio_at(r, round_index=schedule),
                              max_ratio=r.max_ratio)
        return RoundTask(round_index=index, cursor=cursor,
                         max_new_tokens=new_token_budget(self.trains[site], round_index=schedule,
                                                         ratio=ratio),
                         skip=tuple(sorted(self.state.skipped.get(site, ()))),
                         shards=self.merger.shards, replay_ratio=ratio,
                         replay_weights=tuple(sorted(control.weights.items())),
                         lr_scale=control.lr_scale)

    def _broadcast(self) -> tuple:
        """This round's weights in the object store (read zero-copy by every worker on a
        node): all of them, or the LoRA adapters (A and B) and, once, the frozen base. With
        merge.downlink, a function giving each site its own: the changes since what it holds."""
        if self.merger.downlink is not None:
            return self.merger.downlink.send, None
        if not self.lora:
            return ray.put({n: t.numpy() for n, t in self.global_weights.items()}), None
        if self.base_ref is None:
            self.base_ref = ray.put({n: p.data.numpy() for n, p in self.model.named_parameters()
                                     if not is_adapter(n)})
        adapter = {n: p.data.numpy() for n, p in self.model.named_parameters() if is_adapter(n)}
        return ray.put(adapter), self.base_ref

    def _collect(self, tasks: dict[str, RoundTask], *, on_answer
                 ) -> tuple[RoundResult, Parts, dict[str, float]]:
        """Every site's answer by the deadline, checked: the self-reports against the plan,
        then the deltas (layout, finite, norm). Also the seconds each step took."""
        clock = time.perf_counter()
        seconds = {}
        weights, base = self._broadcast()
        dispatched = self._dispatch(tasks, weights=weights, base=base)
        seconds["broadcast"], clock = time.perf_counter() - clock, time.perf_counter()
        self.writer.wait()  # the previous version, written while these train
        seconds["previous_version"], clock = time.perf_counter() - clock, time.perf_counter()
        round_index = next(iter(tasks.values())).round_index if tasks else 0
        kill_point("training", round_index)
        gathered = self.fleet.gather(dispatched, round_index=round_index, on_answer=on_answer,
                                     timeout_s=self.config.merge.round_timeout_s)
        seconds["gather"], clock = time.perf_counter() - clock, time.perf_counter()
        for site in gathered.idle:  # a watched site may get new files: it sits this round out
            if not next(s for s in self.config.sites if s.name == site).watch:
                self.state.exhausted.add(site)
        quarantined = [e for site, found in sorted(gathered.damaged.items())
                       for e in note_damaged(self.run_dir, self.state, site, found)]
        refused = {u.worker_id: why for u in gathered.updates
                   if (why := self._report_problem(u, tasks[u.worker_id]))}
        bounded = [u for u in gathered.updates if u.worker_id not in refused]
        accepted, rejected = self.merger.validate(bounded, gathered.parts)
        for site, why in {**refused, **rejected}.items():
            log.warning("round update of site %s rejected: %s; its rows stay unconsumed",
                        site, why)
        result = RoundResult(accepted, gathered.failures, gathered.idle,
                             rejected={**refused, **rejected}, quarantined=quarantined,
                             unavailable=gathered.unavailable)
        self.fleet.count_misses(answered=[u.worker_id for u in accepted],
                                missed=result.reasons, state=self.state)
        seconds["validate"] = time.perf_counter() - clock
        return result, gathered.parts, seconds

    def _dispatch(self, tasks: dict[str, RoundTask], *, weights, base):
        return self.fleet.dispatch(tasks, weights=weights, base=base)

    def _report_problem(self, update, task: RoundTask) -> str | None:
        """What a site claims (rows, cursor, tokens, weight) against what the coordinator
        planned for it: no site can claim more than its round allowed."""
        w = self.trains[update.worker_id].worker
        return report_problem(update, previous=task.cursor, budget=task.max_new_tokens,
                              local_steps=w.local_steps, max_epochs=w.early_stopping.max_epochs,
                              listed=listed_names(self._site(update.worker_id).path),
                              shared_sequences=self.config.replay.scope == "shared")

    def _steer(self, round_index: int, evals: dict | None, gate: list[str]) -> bool:
        """The gate's and the forgetting budget's steering of the next rounds
        (trainer/control.py); returns whether this round's rows count as consumed (the rows
        of a first rejection are trained again once)."""
        if not evals or not self.steered:
            return True
        r, control = self.config.replay, dataclasses.replace(self.state.control, decisions=[])
        base = ratio_at(r, round_index=round_index + 1)
        strata = list(ray.get(self.replay.sizes.remote()))
        if self.protected:
            control = after_gate(control, rejected=bool(gate), covers=self.covers,
                                 regressed=[g.split(":")[0] for g in gate], strata=strata,
                                 max_ratio=r.max_ratio, base_ratio=base, groups=r.groups,
                                 budget=r.target_forgetting is not None)
        if r.target_forgetting is not None and not gate:
            control = budget_step(control, evals=evals, history=self.writer.history,
                                  covers=self.covers, strata=strata, base_ratio=base,
                                  groups=r.groups,
                                  target=r.target_forgetting, z=self.config.quality.z(),
                                  max_ratio=r.max_ratio)
        self.state.control = control
        return not (gate and control.retry)

    def _settle(self, round_index: int, result: RoundResult, *, accepted: bool,
                consumed: bool = True) -> None:
        """The round's rows are consumed (a rejected candidate's too, unless they are to be
        retried); an accepted round's workers commit their state and its sequences join the
        replay store."""
        self.state.round = round_index
        for update in result.updates if consumed else ():
            self.state.cursors[update.worker_id] = update.cursor
        if accepted:
            self.saving += self.fleet.commit([u.worker_id for u in result.updates],
                                             round_index=round_index)
            ray.get([self.replay.add.remote(u.worker_id, u.sequences, round_index=round_index)
                     for u in result.updates if u.sequences.num_rows])  # none: scope site

    def _publish(self, result: RoundResult, evals: dict | None, *, gate: list[str],
                 consumed: bool, timing: Timing) -> None:
        number = self.state.version + 1
        durable, self.saving = self.saving, []
        self.writer.write(
            number, state=self.state, result=result, gate=gate, timing=timing, consumed=consumed,
            evaluate=(lambda: evals) if evals is not None else self._evaluate, durable=durable,
            outer_state=self.merger.state_dict(),
            nodes={s: p.get("node") for s, p in self.fleet.placement.items()},
            background=self.config.run.overlap and not gate)
        self.state.version = number
        if gate:
            log.warning("round %d: candidate v%04d rejected by the quality gate: %s",
                        self.state.round, number, "; ".join(gate))
        else:
            self.state.accepted = number

    def _rejections_message(self, gate: list[str]) -> str:
        count = self.state.control.rejections
        return (f"the quality gate rejected {count} candidates in a row (quality.max_rejections"
                f"={self.config.quality.max_rejections}); the last: {'; '.join(gate)}. The run "
                f"stops at v{self.state.accepted:04d}, the last accepted version, instead of "
                "consuming more data to no effect: the rows of a rejected round were retried "
                "once with more replay and a lower learning rate, then counted as consumed "
                "(versions/rejected/ lists them). Check the protected sets and worker.lr, then "
                f"`tributary resume {self._user_run_dir()}`.")

    def _evaluate(self) -> dict[str, EvalResult]:
        return {data.name: evaluate(self.model, data) for data in self.eval_sets}

    # ------------------------------------------------------------------ bookkeeping

    def _quorum(self, result: RoundResult) -> bool:
        """Enough valid updates to merge? Sites that sat the round out (watched, nothing new)
        do not count towards merge.min_workers."""
        answering = len([s for s in self.state.active(self.config.sites)
                         if s not in result.idle])
        return len(result.updates) >= max(1, min(self.config.merge.min_workers, answering))

    def _round_failed(self, round_index: int, result: RoundResult) -> None:
        text = "; ".join(f"{site}: {why}" for site, why in result.reasons.items())
        log.warning("round %d got %d valid update(s), needs merge.min_workers=%d (%s); "
                    "retrying it", round_index, len(result.updates),
                    self.config.merge.min_workers, text or "no updates")
        self.writer.count_failures(result.reasons)

    def _start_fleet(self) -> None:
        """Start every site's workers; those the cluster cannot place are left out, and the
        run stops if too few remain for merge.min_workers."""
        # Workers restore the state they committed by then: per round (sync), or per task
        # of their own (async).
        committed = (self.state.sequence if self.config.merge.mode == "async"
                     else self.state.round)
        left_out = self.fleet.start(self.state.active(self.config.sites), round_index=committed)
        self.state.leave_out(left_out)
        placeable = len(self.config.sites) - len(self.state.down)
        needed = self.config.merge.min_workers
        if placeable < needed:
            reasons = "; ".join(f"{site}: {why}" for site, why in left_out.items())
            raise RunError(f"only {placeable} site(s) can run, merge.min_workers={needed} "
                           f"needs {needed} ({reasons})")

    def _write_timing(self, *, finish: float | None = None) -> None:
        """RUN_DIR/timing.json: where the time before the first round went (Ray, the
        coordinator's model and data, the workers with each one's DeepSpeed engine, version 0
        written beside them and any wait for it past them) and, at the end, the wait for the
        last version's background evaluation and write; for `benchmarks/round_overhead.py`
        and for anyone whose start is slow."""
        workers = {site: p.get("init_seconds", {}) for site, p in self.fleet.placement.items()}
        timing = {"startup": {**{k: round(v, 3) for k, v in self.startup.items()},
                              "worker_init": workers}}
        if finish is not None:
            timing["finish"] = {"last_version": round(finish, 3)}
        checkpoint.write_json(self.run_dir / "timing.json", timing)
        log.info("start-up seconds: %s", self.startup)

    def _site(self, name: str) -> SiteConfig:
        return next(s for s in self.config.sites if s.name == name)

    def _done(self) -> bool:
        return self.config.rounds is not None and self.state.round >= self.config.rounds

    def _say_waiting(self, outcome: str) -> None:
        """One line when an idle (or storage-bound) run starts waiting, not one every poll."""
        if not self.waiting:
            why = ("no new data at any site" if outcome == "idle" else
                   "the storage of every site with rows left is unavailable")
            print(f"After round {self.state.round}: {why}; waiting (looking every "
                  f"run.poll_s={self.config.run.poll_s:g} s).", flush=True)
        self.waiting = True

    def _user_run_dir(self) -> str:
        return redact(self.mirror.uri) if self.mirror is not None else str(self.run_dir)

    def shutdown(self) -> None:
        self.fleet.shutdown()
        ray.kill(self.replay, no_restart=True)
        self.merger.shutdown()


def run_training(config: Config, *, resume: bool = False, worker_cls: type = Worker,
                 exclude: Mapping[str, set[str]] | None = None) -> Path:
    """Run (or resume) a whole training run; returns the newest version's folder (the local
    staging copy's, when run.dir is a URI). `exclude`: {site: file names} never to read
    (trainer/retract.py); they stay excluded through the manifests' `skipped`."""
    config, mirror = _staging(config, resume=resume)
    run_dir = Path(config.run.dir)
    if not resume and (run_dir / "versions").exists():
        raise RunError(f"{run_dir} already holds a run; use `tributary resume {run_dir}` "
                       "or choose another run.dir")
    run_dir.mkdir(parents=True, exist_ok=True)
    with RunLock(run_dir, role="resume" if resume else "run"):  # one writer per run
        return _train(config, mirror, resume=resume, worker_cls=worker_cls, exclude=exclude)


def _train(config: Config, mirror, *, resume: bool, worker_cls: type,
           exclude: Mapping[str, set[str]] | None) -> Path:
    run_dir = Path(config.run.dir)
    for key in credential_keys(config):
        log.warning("%s holds credentials: this run uses them, but they are not written to "
                    "config.yaml, manifests or logs; for `tributary resume`, give them through "
                    "the environment (e.g. AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY)", key)
    dump_config(config if mirror is None else _with_dir(config, mirror.uri),
                run_dir / "config.yaml")
    clock = time.perf_counter()
    started = connect(address=config.cluster.address, num_cpus=config.cluster.num_cpus,
                      dashboard_host=config.cluster.dashboard_host,
                      dashboard_port=config.cluster.dashboard_port,
                      include_dashboard=config.cluster.include_dashboard)
    ray_seconds = time.perf_counter() - clock
    coordinator = None
    try:
        coordinator = Coordinator(config, resume=resume, worker_cls=worker_cls, mirror=mirror,
                                  exclude=exclude)
        coordinator.startup = {"ray": ray_seconds, **coordinator.startup}
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
