"""The site side of a round: a plain class, wrapped by the coordinator as a named Ray actor.

One round, top to bottom (`train_round`): read the next new tokens of the site's increments
(workers/reader.py), load the global weights into the DeepSpeed engine, take the optimizer
steps with replay mixed in (workers/steps.py), and return θ_local − θ_global with the exact
rows consumed. `commit` persists what an accepted round changed (workers/state.py); a round
that is not accepted is rolled back before the next one.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import ray
import torch
from safetensors.torch import load_file, save_file

from cluster.resources import current_node
from workers import engine as ds
from workers import rng
from workers.budget import new_token_budget, replay_per_batch
from workers.compression import Packed, pack_delta, payload_bytes, split_payload
from workers.downlink import HeldWeights
from workers.increments import cursor_after, increment_step, merge_ranges
from workers.lora import apply_lora, is_trained
from workers.model import build_model
from workers.packing import empty_sequences, real_tokens
from workers.partitions import EngineWeights, Layout, split_slices
from workers.reader import NewRows, RowReader
from workers.replay import ReplayStore, site_key
from workers.retry import StorageUnavailable
from workers.state import StateStore, StateWriter
from workers.steps import RoundPlan, RoundSteps, Trained, split_holdout
from workers.types import (
    Cursor,
    GroupSpec,
    NoData,
    RoundTask,
    SiteConfig,
    TrainSpec,
    WorkerUpdate,
)

log = logging.getLogger(__name__)

# sample(n, seed, round_index=r) -> sequences table; seed is a list of ints so every
# (run, round, site) draws its own reproducible sample whatever order the workers ask in.
ReplaySampler = Callable[[int, list], pa.Table]
RESIDUAL = "residual.safetensors"  # error feedback of delta compression
# What a Worker actor is created with: `durable` runs in its own thread, beside a round.
ACTOR_OPTIONS = {"concurrency_groups": {"io": 1}}


class Worker:
    def __init__(self, *, site: SiteConfig, model_config: dict, tokenizer, train: TrainSpec,
                 replay: ReplaySampler | None = None, state_dir: str | None = None,
                 group: GroupSpec | None = None, state_uri: str | None = None) -> None:
        started = time.perf_counter()
        self.site, self.train = site, train
        self.group = group or GroupSpec(rank=0, size=1, master_addr="127.0.0.1", master_port=0)
        self.replay, self.local_replay = replay, None
        if train.local_replay_capacity > 0:  # replay.scope: site — samples stay here
            self.local_replay = ReplayStore(capacity=train.local_replay_capacity,
                                            seed=train.seed, policy=train.replay)
            self.replay = self.local_replay.sample
        self.reader = RowReader(site=site, tokenizer=tokenizer, seq_len=train.worker.seq_len,
                                max_row_chars=train.worker.max_row_chars,
                                stratum=lambda file: train.replay.stratum(site.name, file))
        # pyarrow imports pandas on its first table (0.1-0.2 s): paid here, not in round 1
        empty_sequences()
        self.states = StateStore(state_dir, uri=state_uri, keep=train.keep_states)
        self.state_writer = StateWriter(self.states)
        engine_started = time.perf_counter()
        self.engine = self._engine(model_config)
        self.weights = EngineWeights(self.engine, rank=self.group.rank)
        self.init_seconds = {"engine": time.perf_counter() - engine_started}
        self.device = self.engine.device
        self.steps = RoundSteps(engine=self.engine, train=train, group=self.group,
                                site=site.name, sample_replay=self._sample_replay)
        self.base_loaded = train.lora is None  # with LoRA the base arrives with round 1
        self.held = HeldWeights()  # merge.downlink: the global weights as last received
        self.seconds: dict[str, float] = {}  # where this round's time went, besides training
        # The state on disk matches the last round the coordinator accepted; after training a
        # round that is then not accepted, the in-memory state is rolled back.
        self.committed_round, self.dirty = 0, False
        self.pending: pa.Table | None = None  # this round's sequences, kept until commit
        self.snapshot: dict | None = None  # the optimizer state's copy the last commit wrote
        # Error feedback: what compression has not yet delivered (committed / this round's).
        self.residual: dict[str, np.ndarray] | None = None
        self.pending_residual: dict[str, np.ndarray] | None = None
        # The generators as a fresh worker has them: restored for a site with no saved state.
        self.initial_rng = rng.capture()
        self.init_seconds["total"] = time.perf_counter() - started

    def _engine(self, model_config: dict):
        w, train = self.train.worker, self.train
        if self.group.size == 1:
            ds.init_single_rank_group()
        else:
            ds.init_group(rank=self.group.rank, size=self.group.size,
                          master_addr=self.group.master_addr, master_port=self.group.master_port)
        torch.manual_seed(train.seed)
        self.zero3 = ds.zero3_setting(train.deepspeed)  # kept: transformers holds it weakly
        model = build_model(model_config, dtype=ds.TORCH_DTYPES[ds.precision(train.deepspeed)])
        if train.lora is not None:  # adapters only train
            model = apply_lora(model, train.lora, seed=train.seed)
        return ds.build_engine(model, ds_config=train.deepspeed, lr=w.lr,
                               weight_decay=w.weight_decay, micro_batch=w.batch_size)

    def ready(self) -> dict:
        return {"site": self.site.name, "host": socket.gethostname(), "pid": os.getpid(),
                "device": str(self.device), "node": current_node(), "rank": self.group.rank,
                "init_seconds": self.init_seconds}

    # ------------------------------------------------------------------ one round

    def plan(self, *, round_index: int, cursor: Cursor) -> RoundTask:
        """The task a coordinator would give this worker (to use a Worker on its own)."""
        budget = new_token_budget(self.train, round_index=round_index,
                                  replay=self.replay is not None)
        return RoundTask(round_index=round_index, cursor=cursor, max_new_tokens=budget)

    def train_round(self, task: RoundTask, weights: dict, base: dict | None = None
                    ) -> WorkerUpdate | NoData:
        """`weights` are the tensors the run federates (all of them, or a LoRA adapter), or
        with merge.downlink their change since the version held here; `base` the frozen
        rest, loaded once."""
        # First, whatever happens next: the coordinator counts on this worker holding them.
        started = time.perf_counter()
        weights, received = self.held.receive(weights)
        self.seconds = {"load_seconds": time.perf_counter() - started}
        if self.dirty:  # the last round trained here was not accepted: undo its state
            self.restore(round_index=self.committed_round)
        self.pending = None
        has_replay = self.replay is not None
        tokens = min(task.max_new_tokens, new_token_budget(
            self.train, round_index=task.round_index, replay=has_replay, ratio=task.replay_ratio))
        try:
            started = time.perf_counter()
            rows = self.reader.read(task.cursor, tokens=tokens, skip=frozenset(task.skip))
            self.seconds["read_seconds"] = time.perf_counter() - started
        except StorageUnavailable as exc:  # not the data's fault: sit out, read it later
            log.warning("site %s sits round %d out: %s", self.site.name, task.round_index, exc)
            return NoData(self.site.name, task.round_index, unavailable=str(exc))
        if not rows.ranges:
            return NoData(self.site.name, task.round_index, quarantined=tuple(rows.damaged))
        replay = replay_per_batch(self.train, round_index=task.round_index, replay=has_replay,
                                  ratio=task.replay_ratio)
        plan = RoundPlan(round_index=task.round_index,
                         new_per_batch=self.train.worker.batch_size - replay,
                         replay_per_batch=replay,
                         increment_step=increment_step(task.cursor,
                                                       first_file=rows.ranges[0].file),
                         run_step=task.cursor.run_steps, lr_scale=task.lr_scale,
                         replay_weights=dict(task.replay_weights))
        return self._train(task, plan, rows, weights, base, received=received)

    def _train(self, task: RoundTask, plan: RoundPlan, rows: NewRows, weights: dict,
               base: dict | None, *, received: int) -> WorkerUpdate:
        fraction = self.train.worker.early_stopping.holdout_fraction
        sequences, holdout = split_holdout(rows.sequences, fraction)
        if sequences.num_rows == 0:  # only blank rows: consumed, nothing to train
            return self._update(task, plan, {}, rows, sequences, trained=Trained(),
                                received=received)
        started = time.perf_counter()
        received += self._load(weights, base)
        self.seconds["load_seconds"] += time.perf_counter() - started
        started = time.perf_counter()
        self.dirty, self.pending = True, sequences
        trained = self.steps.run(plan, sequences, holdout, anchor=self.steps.anchor(weights))
        trained = dataclasses.replace(trained, seconds=time.perf_counter() - started)
        # Every rank sends the slice of the fp32 masters it owns (all of it at ZeRO-0 on
        # rank 0, nothing on the others): no rank gathers the model.
        started = time.perf_counter()
        delta, layout = self._delta(weights)
        payload, residual = pack_delta(delta, kind=self.train.compression,
                                       residual=self.residual)
        self.pending_residual = residual if self.train.error_feedback else None
        self.seconds["delta_seconds"] = time.perf_counter() - started
        return self._update(task, plan, payload, rows, sequences, trained=trained,
                            holdout=holdout, received=received, layout=layout)

    def train_round_split(self, task: RoundTask, weights: dict, base: dict | None = None
                          ) -> tuple:
        """`train_round` with the delta cut into `task.shards` (tensor names). The coordinator
        calls it with Ray's num_returns=len(shards) + 1, so each slice is its own object that
        a reducer reads where it lies; the coordinator fetches only the first value, the
        update without its delta."""
        answer = self.train_round(task, weights, base)
        shards = [list(names) for names in task.shards]
        if isinstance(answer, NoData) or not answer.delta:
            return (answer, *([None] * len(shards)))
        parts = [(payload, {n: answer.layout[n] for n in names if n in answer.layout})
                 for payload, names in zip(split_payload(answer.delta, shards), shards,
                                           strict=True)]
        return (dataclasses.replace(answer, delta={}), *parts)

    def _load(self, weights: dict, base: dict | None) -> int:
        """Load the round's weights; returns the bytes of the base received (once)."""
        received = 0
        if not self.base_loaded and base is not None:
            self.weights.load_(base, strict=False)
            self.base_loaded, received = True, _nbytes(base)
        self.weights.load_(weights, strict=self.train.lora is None)
        return received

    def _update(self, task: RoundTask, plan: RoundPlan, delta: dict | Packed, rows: NewRows,
                sequences: pa.Table, *, trained: Trained, holdout: pa.Table | None = None,
                received: int = 0, layout: Layout | None = None) -> WorkerUpdate:
        consumed = merge_ranges(rows.ranges)
        new_tokens = real_tokens(sequences)
        losses = trained.losses
        return WorkerUpdate(
            worker_id=self.site.name, round=plan.round_index, delta=delta, layout=layout or {},
            # Repeated passes weigh in: the new tokens of every epoch actually run.
            weight=float(new_tokens * trained.epochs),
            consumed=consumed, cursor=cursor_after(consumed, task.cursor, steps=len(losses)),
            sequences=sequences if self.local_replay is None else empty_sequences(),
            quarantined=tuple(rows.damaged),
            metrics={"loss": float(np.mean(losses)) if losses else None,
                     "steps": len(losses), "epochs": trained.epochs,
                     "new_tokens": new_tokens, "replay_tokens": trained.replay_tokens,
                     "holdout_tokens": real_tokens(holdout) if holdout is not None else 0,
                     "holdout_loss": trained.holdout_losses,
                     "lr": trained.lrs, "train_seconds": trained.seconds, **self.seconds,
                     "bytes_sent": payload_bytes(delta), "bytes_received": received,
                     "tokens_per_s": (new_tokens * trained.epochs + trained.replay_tokens)
                     / trained.seconds if trained.seconds else 0.0})

    def _sample_replay(self, count: int, round_index: int, weights: dict) -> pa.Table:
        if count == 0 or self.replay is None:
            return empty_sequences()
        return self.replay(count, [self.train.seed, round_index, site_key(self.site.name)],
                           round_index=round_index, weights=weights)

    def _delta(self, global_weights: dict) -> tuple[dict[str, np.ndarray], Layout]:
        """This rank's fp32 masters minus the global weights: (delta, where its slices go)."""
        names = None
        if self.train.lora is not None:  # the frozen A and base: no update to send
            names = [n for n in self.weights.params if is_trained(n)]
        return split_slices(self.weights.masters(names), global_weights)

    # ------------------------------------------------------------------ committed state

    def commit(self, *, round_index: int) -> None:
        """The coordinator accepted this worker's update of `round_index`: persist the
        optimizer and RNG states (and residual, and site-local replay)."""
        if self.local_replay is not None and self.pending is not None:
            self.local_replay.add(self.site.name, self.pending, round_index=round_index)
        if self.pending is not None:  # the round trained: its residual is now the site's
            self.residual = self.pending_residual
        # Copied now, written on a thread while the next round trains (`durable` says when it
        # is on disk). A site-local replay store goes with it and changes every round: that
        # state is written now.
        self.state_writer.wait()  # the last snapshot is written: its memory is free again
        optimizer = ds.optimizer_snapshot(self.weights, into=self.snapshot)
        self.snapshot, generators, residual = optimizer[0], rng.capture(), self.residual

        def write(folder: Path) -> None:
            ds.write_optimizer_snapshot(optimizer, folder)
            rng.save(generators, folder)  # what the site's next round starts drawing from
            if self.local_replay is not None:
                self.local_replay.save(str(folder / "replay"))
            if residual is not None:
                save_file({k: torch.from_numpy(v) for k, v in residual.items()},
                          str(folder / RESIDUAL))

        self.state_writer.save(round_index, write, background=self.local_replay is None)
        self.committed_round, self.dirty, self.pending = round_index, False, None

    @ray.method(concurrency_group="io")
    def durable(self, _committed: None = None, *, round_index: int) -> None:
        """Returns once the state committed for `round_index` is on disk (the coordinator
        writes that round's version only then). `_committed`: the ref of that `commit`,
        passed so that Ray starts this only once the commit has run."""
        self.state_writer.durable(round_index)

    def restore(self, *, round_index: int) -> int:
        """Load the newest state committed at or before `round_index`, or start fresh if
        there is none. Returns the round whose state was loaded (0: fresh). States committed
        after `round_index` belong to work the run went back from and are dropped."""
        self.state_writer.wait()
        self.states.discard_after(round_index)
        saved = self.states.newest(round_index)
        if saved is not None:
            ds.load_optimizer_state(self.weights, saved)
            self.committed_round = int(saved.name.split("-")[1])
        else:
            ds.clear_optimizer_state(self.weights)
            self.committed_round = 0
        rng.restore((rng.load(saved) if saved else None) or self.initial_rng)
        if self.local_replay is not None:
            self.local_replay.clear()
            if saved is not None and (saved / "replay").is_dir():
                self.local_replay.restore(str(saved / "replay"))
        self.residual = None
        if saved is not None and (saved / RESIDUAL).is_file():
            self.residual = {k: v.numpy() for k, v in load_file(str(saved / RESIDUAL)).items()}
        self.dirty, self.pending = False, None
        return self.committed_round


def _nbytes(weights: dict) -> int:
    return sum(np.asarray(a).nbytes for a in weights.values())
