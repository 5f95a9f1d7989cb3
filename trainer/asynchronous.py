"""Asynchronous merging (`merge.mode: async`): no site waits for another.

Every site always has one task in flight, started from the newest global version. When a
site's update arrives it is checked — its self-report against its task, its delta, its age —
and, unless it is more than `merge.max_staleness` versions old, the site's worker commits it and
the site starts its next task at once, from where those rows end. Every `merge.buffer` accepted
updates are merged (FedBuff): each weighs its tokens × (1 + τ)^-merge.staleness_exponent, τ being
the versions published since the one it trained from. Each merge publishes a version whose
manifest lists every update in it (`lineage`); evaluation, the quality gate and the weights come
every `run.eval_every` versions (and at the end), so a rejection takes the model back to the
last evaluated version and moves the manifests of the merges since into versions/rejected/.
The sites whose updates were in those merges go back too, to the optimizer, RNG and local
replay state they had at that version (a task in flight from the later state is void): what
the gate refused influences no later version through a site's own state, so the lineage of
parents and bases is complete.

Rows enter a manifest only when their update is merged: an update lost in a crash, or refused,
leaves its rows to be trained again — every row exactly once, though a resume does not replay
the arrival order bit for bit (that is a merge.mode sync guarantee).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field

import ray

from trainer import checkpoint
from trainer.faults import kill_point
from trainer.fleet import combine_ranks, reason, restore_ranks
from trainer.manifest import Timing
from trainer.quality import gate_problems
from trainer.quarantine import note_damaged
from trainer.state import RoundResult, RunError
from trainer.threads import StopSignal
from workers.types import NoData, RoundTask, WorkerUpdate

log = logging.getLogger(__name__)


@dataclass
class Flight:
    """A site's task in flight."""

    task: RoundTask
    base: int  # the version whose weights it trains from
    ref: object  # rank 0's answer
    parts: list  # its delta's slices (sharded merging)
    followers: list  # the other ranks' answers (a multi-worker site)
    deadline: float
    started: float
    waiting: list = field(init=False)  # the ranks' answers not yet in
    void: bool = False  # trained from a state a rejection took back: its answer is dropped

    def __post_init__(self) -> None:
        self.waiting = [self.ref, *self.followers]


@dataclass(frozen=True)
class Arrival:
    """An accepted update waiting in the buffer."""

    update: WorkerUpdate
    base: int
    staleness: int
    discount: float
    parts: list
    replay_ratio: float | None  # the replay share its task trained with

    def weighed(self) -> WorkerUpdate:
        return dataclasses.replace(self.update, weight=self.update.weight * self.discount)


@dataclass
class Events:
    """What happened since the last version, for its manifest."""

    failures: dict[str, str] = field(default_factory=dict)
    rejected: dict[str, str] = field(default_factory=dict)
    unavailable: dict[str, str] = field(default_factory=dict)
    quarantined: list[dict] = field(default_factory=list)
    idle: set[str] = field(default_factory=set)


@dataclass
class Activity:
    """Per site since the loop began: seconds with a task in flight, updates merged."""

    began: float = field(default_factory=time.monotonic)
    busy: defaultdict = field(default_factory=lambda: defaultdict(float))
    merged: Counter = field(default_factory=Counter)

    def timing(self, sites: list[str], flights: dict[str, Flight]) -> dict:
        now = time.monotonic()
        minutes = max(now - self.began, 1e-9) / 60
        busy = {s: self.busy[s] + (now - flights[s].started if s in flights else 0.0)
                for s in sites}
        return {"updates_per_min": {s: self.merged[s] / minutes for s in sites},
                "idle_seconds": {s: max(0.0, now - self.began - busy[s]) for s in sites}}


def _mean_discount(arrivals: list[Arrival]) -> float:
    """Σ tokens·discount / Σ tokens: FedBuff's step is Σ discountᵢ·Δᵢ weighed by tokens; the
    weighted average alone normalises the discounts away (one update: none at all)."""
    tokens = sum(a.update.weight for a in arrivals)
    return sum(a.update.weight * a.discount for a in arrivals) / tokens if tokens > 0 else 1.0


class AsyncLoop:
    def __init__(self, coordinator) -> None:
        self.c = coordinator
        self.flights: dict[str, Flight] = {}
        self.buffer: list[Arrival] = []
        self.events = Events()
        self.activity = Activity()
        # Where each site's next task starts: past its updates accepted so far.
        self.planned = dict(coordinator.state.cursors)
        self.resting: dict[str, float] = {}  # site -> not asked again before this time
        self.weights: tuple | None = None  # (version, weights ref, base ref)
        # The last evaluated accepted version, which a rejection goes back to, and the
        # sequences merged since (they join the replay store once a version is accepted).
        self.evaluated = coordinator.state.accepted
        self.evaluated_sequence = dict(coordinator.state.sequence)  # each site's tasks by then
        self.unevaluated = False  # merged since `evaluated`, not yet written whole
        self.sequences: list[tuple[str, object]] = []
        self.started = time.perf_counter()
        if coordinator.protected:  # only a gate goes back
            coordinator.merger.snapshot()

    def run(self, stop: StopSignal) -> None:
        c = self.c
        while not stop.requested and not c._done():
            self._launch()
            kill_point("launched", c.state.round)
            if self.flights:
                self._receive(timeout_s=1.0)
                if len(self.buffer) >= c.config.merge.buffer:
                    self._merge()
            elif self.buffer:  # nothing in flight will fill it up
                self._merge()
            elif c.state.active(c.config.sites) or c.state.watching(c.config.sites):
                stop.wait(min([c.config.run.poll_s, *self._rest_left()]))
            else:
                print(f"No site has rows left (or is up) after version {c.state.version}; "
                      "stopping.")
                break
        for site in list(self.flights):  # unmerged work: its rows are trained again later
            c.fleet.drop(site)
        self.flights.clear()
        if self.buffer or self.unevaluated:  # accepted updates, or merges not yet written whole
            self._merge(final=True)

    # ------------------------------------------------------------------ tasks

    def _launch(self) -> None:
        """Give every site that is free a task from the newest version."""
        c, now = self.c, time.monotonic()
        for site in c.state.active(c.config.sites):
            if site in self.flights or self.resting.get(site, 0) > now:
                continue
            version, weights, base = self._weights()
            task = c.task(site, index=c.state.sequence.get(site, 0) + 1,
                          schedule=c.state.round + 1, cursor=self.planned[site])
            dispatched = c.fleet.dispatch({site: task}, weights=weights, base=base)
            if site in dispatched.failures:
                self._failed(site, dispatched.failures[site])
                continue
            [ref] = dispatched.pending
            self.flights[site] = Flight(
                task=task, base=version, ref=ref, parts=dispatched.parts.get(site, []),
                followers=dispatched.followers.get(site, []),
                deadline=now + c.config.merge.round_timeout_s, started=now)

    def _weights(self) -> tuple:
        """The global weights in the object store, put once per version. Their version is
        the model's (state.accepted): after a rejection that is the one gone back to, not the
        rejected number, so a task's base in the lineage is what it really trained from."""
        version = self.c.state.accepted
        if self.weights is None or self.weights[0] != version:
            self.weights = (version, *self.c._broadcast())
        return self.weights

    def _rest_left(self) -> list[float]:
        now = time.monotonic()
        return [max(0.1, until - now) for until in self.resting.values() if until > now]

    # ------------------------------------------------------------------ answers

    def _receive(self, *, timeout_s: float) -> None:
        """Take the next answer, and fail the tasks past their deadline. A group's task
        answers once all its ranks have; one rank that fails fails the task at once."""
        refs = {ref: site for site, flight in self.flights.items() for ref in flight.waiting}
        ray.wait(list(refs), num_returns=1, timeout=timeout_s)
        # Every answer that is in, before any deadline is applied: after a long merge or
        # evaluation several may be, and each was on time however late it is looked at.
        ready, _ = ray.wait(list(refs), num_returns=len(refs), timeout=0)
        now = time.monotonic()
        for site, flight in list(self.flights.items()):
            if not set(ready) & set(flight.waiting) and flight.deadline < now:
                self._land(site)
                self._failed(site, "no update within merge.round_timeout_s="
                                   f"{self.c.config.merge.round_timeout_s}")
        for ref in ready:
            if refs[ref] in self.flights:
                self._take(refs[ref], ref)

    def _take(self, site: str, ref: ray.ObjectRef) -> None:
        """One rank's answer in: the site's update once all of its ranks have answered."""
        flight = self.flights[site]
        flight.waiting.remove(ref)
        try:
            ray.get(ref)
            if flight.waiting:
                return  # the site's other ranks are still training
            self._land(site)
            if flight.void:  # the site's state went back meanwhile: it goes back now
                self._go_back(site)
                return
            answer, followers = ray.get(flight.ref), ray.get(flight.followers)
        except Exception as exc:  # noqa: BLE001 - a dead actor or an error inside train_round
            if site in self.flights:
                self._land(site)
            self._failed(site, reason(exc))
            return
        self._answer(site, flight, answer, followers)

    def _land(self, site: str) -> Flight:
        flight = self.flights.pop(site)
        self.activity.busy[site] += time.monotonic() - flight.started
        return flight

    def _answer(self, site: str, flight: Flight, answer, followers: list) -> None:
        c = self.c
        self.events.quarantined += note_damaged(c.run_dir, c.state, site, answer.quarantined)
        if isinstance(answer, NoData):
            self._no_data(site, answer)
            return
        update = combine_ranks(answer, followers)
        staleness = c.state.version - flight.base
        problem = c._report_problem(update, flight.task) or self._stale(staleness)
        if problem is None:
            _, refused = c.merger.validate([update], {site: flight.parts})
            problem = refused.get(site)
        if problem:
            log.warning("update of site %s refused: %s; its rows stay unconsumed", site, problem)
            self.events.rejected[site] = problem
            self._missed(site)
            return
        c.saving += c.fleet.commit([site], round_index=flight.task.round_index)
        c.state.sequence[site] = flight.task.round_index
        c.fleet.count_misses(answered=[site], missed=(), state=c.state)
        self.planned[site] = update.cursor
        discount = (1.0 + staleness) ** -c.config.merge.staleness_exponent
        self.buffer.append(Arrival(update, flight.base, staleness, discount, flight.parts,
                                   flight.task.replay_ratio))

    def _no_data(self, site: str, answer: NoData) -> None:
        """Nothing new (a watched site looks again after run.poll_s) or its storage is
        unavailable (it sits out as long)."""
        c = self.c
        if answer.unavailable:
            self.events.unavailable[site] = answer.unavailable
            self._missed(site)
        if answer.unavailable or c._site(site).watch:
            self.resting[site] = time.monotonic() + c.config.run.poll_s
        else:
            c.state.exhausted.add(site)
        self.events.idle.add(site)

    def _stale(self, staleness: int) -> str | None:
        limit = self.c.config.merge.max_staleness
        if staleness > limit:
            return (f"trained from a version {staleness} versions old, over "
                    f"merge.max_staleness={limit}")
        return None

    def _failed(self, site: str, why: str) -> None:
        log.warning("site %s failed: %s; its rows stay unconsumed", site, why)
        self.events.failures[site] = why
        self.c.fleet.drop(site)  # restarted, from its committed state, for its next task
        self._missed(site)

    def _missed(self, site: str) -> None:
        self.c.fleet.count_misses(answered=(), missed=[site], state=self.c.state)

    # ------------------------------------------------------------------ merging

    def _merge(self, *, final: bool = False) -> None:
        """The buffered updates, each weighed by its tokens and staleness discount, into the
        next version; evaluated, gated and written whole every run.eval_every versions and
        at the end. Without a gate or a forgetting budget (nothing steers from the result)
        the version is evaluated and written on a background thread (run.overlap) while the
        sites train on; the next merge waits for it, as the model must not change under it."""
        c, arrivals, self.buffer = self.c, self.buffer, []
        c.writer.wait()
        merge_seconds = (c.merger.propose(*self._keyed(arrivals), scale=_mean_discount(arrivals))
                         if arrivals else 0.0)
        c.state.round += 1  # a version per merge
        kill_point("merged", c.state.round)
        for arrival in arrivals:
            c.state.cursors[arrival.update.worker_id] = arrival.update.cursor
            self.activity.merged[arrival.update.worker_id] += 1
        result = self._result([a.weighed() for a in arrivals])
        self.sequences += [(u.worker_id, u.sequences) for u in result.updates
                           if u.sequences.num_rows]  # none with replay.scope: site
        evaluated = final or c.state.round % c.config.run.eval_every == 0 or c._done()
        later = evaluated and not c.steered and c.config.run.overlap
        evals = c._evaluate() if evaluated and not later else None
        q = c.config.quality
        gate = gate_problems(evals, c.writer.history, protected=c.protected,
                             max_regression=q.max_regression, z=q.z()) if evals else []
        if evaluated:
            if evals:
                c._steer(c.state.round, evals, gate)  # the next tasks' replay and lr
            self._settle(gate)
        self._publish(result, arrivals, evals, gate=gate, merge_seconds=merge_seconds,
                      evaluated=evaluated, later=later)
        self.unevaluated = not evaluated
        if evaluated and not gate:
            self.evaluated, self.evaluated_sequence = c.state.version, dict(c.state.sequence)
        if gate and c.state.control.rejections >= q.max_rejections:
            raise RunError(c._rejections_message(gate))

    def _keyed(self, arrivals: list[Arrival]) -> tuple[list[WorkerUpdate], dict]:
        """The merger keys updates and slices by id: a fast site may have two in a buffer."""
        ids = [f"{a.update.worker_id}#{a.update.round}" for a in arrivals]
        updates = [dataclasses.replace(a.weighed(), worker_id=i) for a, i in zip(arrivals, ids)]
        return updates, {i: a.parts for a, i in zip(arrivals, ids)}

    def _settle(self, gate: list[str]) -> None:
        """An evaluated version: accepted, its merges' sequences join the replay store and
        the model is what a later rejection goes back to; rejected, the model goes back to
        the last evaluated version and the merges since are set aside with it."""
        c, sequences, self.sequences = self.c, self.sequences, []
        if gate:
            c.merger.restore()
            reverted = checkpoint.reject_versions(c.run_dir, after=self.evaluated,
                                                  why=f"went back with v{c.state.version + 1:04d}")
            if c.mirror is not None:
                c.mirror.moved(reverted, to=checkpoint.REJECTED)
            c.state.accepted = self.evaluated
            self._roll_back()
            return
        for site, table in sequences:
            ray.get(c.replay.add.remote(site, table, round_index=c.state.round))
        if c.protected:
            c.merger.snapshot()

    def _roll_back(self) -> None:
        """Every site with tasks merged since the evaluated version goes back to its state of
        then. Their rows stay consumed (by the rejected versions); a task in flight started
        from the later state is void, and its rows are trained again."""
        c = self.c
        for site, merged in list(c.state.sequence.items()):
            back = self.evaluated_sequence.get(site, 0)
            if merged == back:
                continue
            c.state.sequence[site] = back
            self.planned[site] = c.state.cursors[site]
            if site in self.flights:
                self.flights[site].void = True  # goes back once its answer is in
            else:
                self._go_back(site)

    def _go_back(self, site: str) -> None:
        c = self.c
        workers = c.fleet.actors.get(site)
        if workers is None:  # restarted from c.state.sequence with its next task
            return
        try:
            restore_ranks(workers, round_index=c.state.sequence.get(site, 0))
        except Exception as exc:  # noqa: BLE001 - a dead actor: restarted for its next task
            self._failed(site, reason(exc))

    def _result(self, updates: list[WorkerUpdate]) -> RoundResult:
        events, self.events = self.events, Events()
        return RoundResult(updates, events.failures, sorted(events.idle),
                           rejected=events.rejected, quarantined=events.quarantined,
                           unavailable=events.unavailable)

    def _publish(self, result: RoundResult, arrivals: list[Arrival], evals: dict | None, *,
                 gate: list[str], merge_seconds: float, evaluated: bool,
                 later: bool) -> None:
        """Version state.version + 1: evaluated (`evals`, or on the writer's thread when
        `later`) and with weights, or its manifest and metrics line only."""
        c = self.c
        number = c.state.version + 1
        lineage = [{"base": checkpoint.version_name(a.base), "staleness": a.staleness,
                    "discount": a.discount} for a in arrivals]
        sites = [s.name for s in c.config.sites]
        durable, c.saving = c.saving, []
        c.writer.write(number, state=c.state, result=result, gate=gate, lineage=lineage,
                       durable=durable,
                       evaluate=c._evaluate if later else (lambda: evals or {}),
                       background=later,
                       outer_state=c.merger.state_dict(), weights=evaluated,
                       nodes={s: p.get("node") for s, p in c.fleet.placement.items()},
                       timing=Timing(merge_seconds=merge_seconds,
                                     round_seconds=time.perf_counter() - self.started,
                                     replay_ratio=arrivals[-1].replay_ratio if arrivals
                                     else None,
                                     **self.activity.timing(sites, self.flights)))
        self.started = time.perf_counter()
        c.state.version = number
        if gate:
            log.warning("version v%04d rejected by the quality gate: %s", number,
                        "; ".join(gate))
        else:
            c.state.accepted = number
