"""The site fleet: the run's worker actors — started (and reported within seconds when the
cluster cannot place them), restarted after a failure, dropped — and one round's traffic with
them: dispatch every site's task, gather updates, failures and idle answers by the deadline,
count the rounds each site missed, and commit the state of the accepted ones."""

from __future__ import annotations

import dataclasses
import logging
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import ray

from cluster.remote import RemoteMethod
from trainer.config import Config
from trainer.mirror import Mirror
from trainer.placement import infeasible, wait_until_placed, waiting_reason, worker_demand
from trainer.sites import SiteWorkers, all_names, start_site, wait_for_name
from trainer.state import RunState
from workers.compression import unpack_delta
from workers.engine import zero_stage
from workers.partitions import assemble
from workers.storage import join
from workers.types import GroupSpec, NoData, RoundTask, SiteConfig, TrainSpec, WorkerUpdate

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WorkerSetup:
    """What every worker actor of the run is built with."""

    worker_cls: type
    model_config: dict
    tokenizer: object
    trains: Mapping[str, TrainSpec]  # per site: the run's settings with the site's own
    replay: object | None  # the shared replay store actor (None: replay.scope site)
    run_dir: Path
    remote_dir: str | None  # a URI run.dir: committed worker state is published there
    placement_timeout_s: float


@dataclass
class Dispatched:
    """A round in flight: {ref: site} of the rank-0 answers, sites that failed to start,
    the other ranks' refs and the delta slices' refs (sharded merging)."""

    pending: dict = field(default_factory=dict)
    failures: dict[str, str] = field(default_factory=dict)
    followers: dict[str, list] = field(default_factory=dict)
    parts: dict[str, list] = field(default_factory=dict)


@dataclass(frozen=True)
class Gathered:
    updates: list[WorkerUpdate]
    failures: dict[str, str]
    idle: list[str]
    unavailable: dict[str, str]
    damaged: dict[str, tuple[dict, ...]]  # site -> records of damaged files it met
    parts: dict[str, list]


class SiteFleet:
    def __init__(self, sites: list[SiteConfig], *, setup: WorkerSetup) -> None:
        self.sites = {s.name: s for s in sites}
        self.setup = setup
        self.actors: dict[str, SiteWorkers] = {}
        self.placement: dict[str, dict] = {}  # site -> where its rank 0 runs (host, node, pid)
        self.on_drop: list[Callable[[list[str]], None]] = []  # told of replaced workers

    @classmethod
    def for_run(cls, config: Config, *, worker_cls: type, trains: Mapping[str, TrainSpec],
                model, tokenizer, replay, mirror: Mirror | None) -> SiteFleet:
        """The fleet of a run: workers built from the run's model, tokenizer and each
        site's TrainSpec, sampling the shared replay store unless replay.scope is site."""
        return cls(config.sites, setup=WorkerSetup(
            worker_cls=worker_cls, model_config=model.config.to_dict(), tokenizer=tokenizer,
            trains=trains, replay=replay if config.replay.scope == "shared" else None,
            run_dir=Path(config.run.dir), remote_dir=mirror.uri if mirror else None,
            placement_timeout_s=config.cluster.placement_timeout_s))

    # ------------------------------------------------------------------ lifecycle

    def start(self, names: list[str], *, round_index: int | Mapping[str, int]
              ) -> dict[str, str]:
        """Start these sites' workers (restoring the state committed by `round_index`).
        Returns {site: why} for those the cluster cannot place: reported within seconds,
        not waited on. One that fails to start otherwise is retried in its round."""
        left_out, starting = {}, []
        for site in names:
            problem = infeasible(self.demand(site))
            try:
                if problem is None:
                    self._create(site)
                    starting.append(site)
            except Exception as exc:  # noqa: BLE001 - a group that could not be placed, or any error
                problem = reason(exc)
            if problem is not None:
                left_out[site] = problem
        timeout = self.setup.placement_timeout_s
        placed = wait_until_placed({s: self.actors[s].names for s in starting}, timeout_s=timeout)
        for site in [s for s, ok in placed.items() if not ok]:
            left_out[site] = waiting_reason(self.demand(site), timeout_s=timeout,
                                            workers=self.sites[site].num_workers)
        for site, why in left_out.items():
            log.error("site %s cannot be placed: %s. It is left out of this run (`tributary "
                      "resume` tries again).", site, why)
            self.drop(site)
        for site in [s for s in starting if s not in left_out]:
            committed = (round_index.get(site, 0) if isinstance(round_index, Mapping)
                         else round_index)
            self._ready(site, round_index=committed)
        return left_out

    def demand(self, site: str) -> dict[str, float]:
        w = self.setup.trains[site].worker
        return worker_demand(num_cpus=w.num_cpus, num_gpus=w.num_gpus,
                             resources=self.sites[site].resources)

    def _ready(self, site: str, *, round_index: int) -> None:
        try:
            answers = ray.get(self.actors[site].call("ready"))
            if round_index > 0:
                restore_ranks(self.actors[site], round_index=round_index)
            self.placement[site] = answers[0]
            for answer in answers:
                log.info("worker of site %s runs on %s", site, answer)
        except Exception as exc:  # noqa: BLE001 - any failure to start is retried
            log.warning("worker of site %s did not start: %s", site, reason(exc))
            self.drop(site)

    def _create(self, site_name: str) -> SiteWorkers:
        site, setup = self.sites[site_name], self.setup
        folder = setup.run_dir / "sites" / site.name

        def kwargs(group: GroupSpec | None) -> dict:
            rank = group.rank if group else 0
            state = "state" if rank == 0 else f"state-rank{rank}"
            return {"site": site, "model_config": setup.model_config,
                    "tokenizer": setup.tokenizer, "train": setup.trains[site.name],
                    "group": group,
                    "replay": RemoteMethod(setup.replay, "sample") if setup.replay else None,
                    "state_dir": str(folder / state),
                    "state_uri": join(setup.remote_dir, "sites", site.name, state)
                    if setup.remote_dir else None}

        w = setup.trains[site_name].worker
        self.actors[site_name] = start_site(
            worker_cls=setup.worker_cls, site=site.name, size=site.num_workers,
            num_cpus=w.num_cpus, num_gpus=w.num_gpus, resources=site.resources,
            make_kwargs=kwargs, ready_timeout_s=setup.placement_timeout_s,
            malloc_mmap_threshold=w.mmap_threshold(zero_stage=zero_stage(
                setup.trains[site_name].deepspeed)))
        return self.actors[site_name]

    def _restarted(self, site: str, *, round_index: int) -> SiteWorkers:
        """The site's workers, created again (with their committed state) if they died."""
        if site not in self.actors:
            problem = infeasible(self.demand(site))  # e.g. the node it was pinned to is gone
            if problem is not None:
                raise RuntimeError(f"cannot restart its workers: {problem}")
            workers = self._create(site)
            if round_index > 0:
                restore_ranks(workers, round_index=round_index)
        return self.actors[site]

    def drop(self, site: str) -> None:
        workers = self.actors.pop(site, None)
        if workers is not None:
            workers.kill()
        for listener in self.on_drop:  # what the old workers held is gone with them
            listener([site])

    def shutdown(self) -> None:
        for site in list(self.actors):
            self.drop(site)
        for site in self.sites.values():  # names are released asynchronously; reuse waits
            for name in all_names(site.name, site.num_workers):
                try:
                    wait_for_name(name, timeout_s=30)
                except RuntimeError as exc:
                    log.warning("%s", exc)

    # ------------------------------------------------------------------ one round

    def dispatch(self, tasks: Mapping[str, RoundTask], *, weights, base=None) -> Dispatched:
        """Start every task (`weights` and `base` are object refs, read zero-copy; `weights`
        may be a function of the site, with downlink compression). With sharded merging
        (`task.shards`) the delta comes back as separate slices."""
        out = Dispatched()
        for site, task in tasks.items():
            try:
                workers = self._restarted(site, round_index=task.round_index - 1)
            except Exception as exc:  # noqa: BLE001 - it died while starting or restoring its state
                out.failures[site] = reason(exc)
                self.drop(site)
                continue
            args = (task, weights(site) if callable(weights) else weights, base)
            # Every rank of a multi-worker site trains the round; each answers with the
            # slices of the delta it owns (ZeRO), rank 0's answer also speaks for the site.
            if task.shards:
                calls = [a.train_round_split.options(num_returns=len(task.shards) + 1)
                         .remote(*args) for a in workers.actors]
                answers = [refs[0] for refs in calls]
                # Reducer i reads slice i of every rank (a list of refs for a group).
                slices = [refs[1:] for refs in calls]
                out.parts[site] = slices[0] if len(calls) == 1 else [list(s) for s in zip(*slices)]
            else:
                answers = [a.train_round.remote(*args) for a in workers.actors]
            out.pending[answers[0]], out.followers[site] = site, answers[1:]
        return out

    def gather(self, dispatched: Dispatched, *, round_index: int, timeout_s: float,
               on_answer: Callable[[], None] = lambda: None) -> Gathered:
        """Every answer until all sites answered or the deadline passed; a site that did not
        answer in time is a failure, and its workers are replaced. A group answers once all
        its ranks have; one rank that fails fails its site at once (the others would wait
        in a collective for it until the deadline)."""
        primary = {site: ref for ref, site in dispatched.pending.items()}
        waiting = dict(dispatched.pending)  # every rank's ref -> its site
        for site, refs in dispatched.followers.items():
            waiting.update(dict.fromkeys(refs, site))
        ranks_left = Counter(waiting.values())
        failures = dict(dispatched.failures)
        updates, idle, unavailable, damaged = [], [], {}, {}
        deadline = time.monotonic() + timeout_s
        while waiting:
            ready, _ = ray.wait(list(waiting), num_returns=1,
                                timeout=max(0.0, deadline - time.monotonic()))
            if not ready:
                break
            site = waiting.pop(ready[0])
            try:
                ray.get(ready[0])
                ranks_left[site] -= 1
                if ranks_left[site]:
                    continue  # the site's other ranks are still training
                answer = ray.get(primary[site])
                followers = ray.get(dispatched.followers.get(site, []))
            except Exception as exc:  # noqa: BLE001 - a dead actor or an error inside train_round
                failures[site] = reason(exc)
                self.drop(site)
                waiting = {ref: s for ref, s in waiting.items() if s != site}
                on_answer()
                continue
            on_answer()
            damaged[site] = answer.quarantined
            if isinstance(answer, NoData) and answer.unavailable:
                unavailable[site] = answer.unavailable
            elif isinstance(answer, NoData):
                idle.append(site)
            elif answer.round == round_index:
                updates.append(combine_ranks(answer, followers))
        for site in set(waiting.values()):  # stragglers: their rows stay unconsumed
            failures[site] = f"no update within merge.round_timeout_s={timeout_s}"
            self.drop(site)
        return Gathered(sorted(updates, key=lambda u: u.worker_id), failures, idle,
                        unavailable, damaged, dispatched.parts)

    def count_misses(self, *, answered: Iterable[str], missed: Iterable[str],
                     state: RunState) -> None:
        """Track sites that fail round after round (or task after task, in merge.mode async);
        past worker.max_missed_rounds they are reported and left out (until `tributary
        resume`) instead of restarted every time. A usable update resets the count."""
        for site in answered:
            state.missed[site] = 0
        for site in missed:
            limit = self.setup.trains[site].worker.max_missed_rounds
            state.missed[site] = state.missed.get(site, 0) + 1
            if state.missed[site] > limit:
                state.down.add(site)
                self.drop(site)
                log.error("site %s failed %d rounds in a row (worker.max_missed_rounds=%d); "
                          "it is left out of this run until `tributary resume`", site,
                          state.missed[site], limit)

    def commit(self, sites: list[str], *, round_index: int) -> list:
        """Accepted workers take a copy of their state to persist, and write it while their
        next round trains. Returns the refs that resolve once each is on disk: the version
        is written only then, so a crash in between resumes from the previous version with
        that version's state. Nothing here waits: each rank's `durable` takes its `commit`
        as an argument, so Ray runs it only after the copy is taken (a commit that failed
        fails its `durable`, reported where the version waits), and the worker's next task
        queues behind its commit."""
        durable = []
        for site in sites:
            try:
                workers = self.actors[site]
                durable += workers.chain("durable", after=workers.call(
                    "commit", round_index=round_index), round_index=round_index)
            except Exception as exc:  # noqa: BLE001 - its workers are gone
                self._state_lost(site, exc)
        return durable

    def _state_lost(self, site: str, exc: Exception) -> None:
        log.warning("site %s could not save its optimizer state: %s", site, exc)
        self.drop(site)


def restore_ranks(workers: SiteWorkers, *, round_index: int) -> int:
    """Every rank loads its state committed at or before `round_index`, and all from the same
    round: a rank that died while writing its newest state has an older one, and the others
    then go back to it too (ranks at different rounds would train an inconsistent optimizer).
    Returns the round loaded."""
    loaded = ray.get(workers.call("restore", round_index=round_index))
    if len(set(loaded)) > 1:
        log.warning("the ranks of site %s hold states of rounds %s; all go back to round %d",
                    workers.site, loaded, min(loaded))
        ray.get(workers.call("restore", round_index=min(loaded)))
    return min(loaded)


def combine_ranks(answer: WorkerUpdate, followers: Sequence[WorkerUpdate]) -> WorkerUpdate:
    """A site's update from its ranks' answers: rank 0's, with the delta put together from
    the slices every rank sent (unpacked to fp32). With sharded merging the slices went to
    the reducers instead, and the delta here is empty."""
    ranks = [answer, *followers]
    pieces = [(unpack_delta(a.delta), a.layout) for a in ranks if a.delta]
    sent = sum(a.metrics.get("bytes_sent", 0) for a in ranks)
    return dataclasses.replace(answer, delta=assemble(pieces), layout={},
                               metrics={**answer.metrics, "bytes_sent": sent})


def reason(exc: BaseException) -> str:
    """One line for manifests and logs: the worker's own exception, not Ray's wrapper."""
    if isinstance(exc, ray.exceptions.RayTaskError) and exc.cause is not None:
        exc = exc.cause
    lines = str(exc).strip().splitlines() or [""]
    return f"{type(exc).__name__}: {lines[0][:300]}"
