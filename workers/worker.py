"""The site side of a round: a plain class, wrapped by the coordinator as a named Ray actor.

One round, top to bottom (`train_round`): load the global weights into the engine, read the
next unconsumed rows of the site's increments, pack them, mix in replay sequences, take the
optimizer steps, and return θ_local − θ_global with the exact rows consumed.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import shutil
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from safetensors.torch import load_file, save_file

from cluster.resources import current_node
from workers import engine as ds
from workers import rng
from workers.compression import Packed, pack_delta, payload_bytes, split_payload
from workers.fsio import fsync_dir, fsync_tree
from workers.increments import (
    cursor_after,
    increment_files,
    increment_step,
    iter_rows,
    merge_ranges,
)
from workers.lora import apply_lora, is_trained
from workers.model import build_model, mean_nll
from workers.packing import batch_tensors, empty_sequences, pack_stream, real_tokens, to_arrays
from workers.replay import ReplayStore, ratio_at, site_key
from workers.retry import StorageUnavailable
from workers.schedule import lr_at
from workers.storage import (
    DataFile,
    delete_tree,
    download_tree,
    join,
    list_names,
    read_text,
    upload_tree,
    write_text,
)
from workers.types import (
    Cursor,
    GroupSpec,
    NoData,
    RowRange,
    SiteSpec,
    TrainSpec,
    WorkerUpdate,
)

log = logging.getLogger(__name__)

# sample(n, seed, round_index=r) -> sequences table; seed is a list of ints so every
# (run, round, site) draws its own reproducible sample whatever order the workers ask in.
ReplaySampler = Callable[[int, list], pa.Table]
KEEP_STATES = 2
RESIDUAL = "residual.safetensors"  # error feedback of delta compression
STATE_DONE = "_COMPLETE"  # marks a fully uploaded state (run.dir on an object store)


class Worker:
    def __init__(self, *, site: SiteSpec, model_config: dict, tokenizer, train: TrainSpec,
                 replay: ReplaySampler | None = None, state_dir: str | None = None,
                 group: GroupSpec | None = None, state_uri: str | None = None) -> None:
        self.site = site
        self.group = group or GroupSpec(rank=0, size=1, master_addr="127.0.0.1", master_port=0)
        self.train = train
        self.tokenizer = tokenizer
        self.replay = replay
        self.local_replay = None
        if train.local_replay_capacity > 0:  # replay.scope: site — samples stay here
            self.local_replay = ReplayStore(capacity_per_site=train.local_replay_capacity,
                                            seed=train.seed, policy=train.replay_policy)
            self.replay = self.local_replay.sample
        self.pending: pa.Table | None = None  # this round's sequences, kept until commit
        self.state_dir = Path(state_dir) if state_dir else None
        self.state_uri = state_uri  # a run.dir on an object store: committed state goes there
        self.quarantined: list[dict] = []  # damaged files met during the current round
        # The last row a round stopped inside, tokenized: the next round continues it.
        self.open_row: tuple[str, int, list[int]] | None = None
        if self.group.size == 1:
            ds.init_single_rank_group()
        else:
            ds.init_group(rank=self.group.rank, size=self.group.size,
                          master_addr=self.group.master_addr,
                          master_port=self.group.master_port)
        torch.manual_seed(train.seed)
        model = build_model(model_config)
        if train.lora is not None:  # adapters only train; the base arrives with round 1
            model = apply_lora(model, train.lora, seed=train.seed)
        self.base_loaded = train.lora is None
        self.engine = ds.build_engine(model, ds_config=train.deepspeed, lr=train.lr,
                                      weight_decay=train.weight_decay, micro_batch=train.batch_size)
        self.device = self.engine.device
        # The optimizer state on disk matches the last round the coordinator accepted; after
        # training a round that is then not accepted, the in-memory state is rolled back.
        self.committed_round = 0
        self.dirty = False
        # Error feedback: what compression has not yet delivered (committed / this round's).
        self.residual: dict[str, np.ndarray] | None = None
        self.pending_residual: dict[str, np.ndarray] | None = None
        # The generators as a fresh worker has them: restored for a site with no saved state.
        self.initial_rng = rng.capture()

    def ready(self) -> dict:
        return {"site": self.site.name, "host": socket.gethostname(), "pid": os.getpid(),
                "device": str(self.device), "node": current_node(), "rank": self.group.rank}

    # ------------------------------------------------------------------ one round

    def train_round(self, *, round_index: int, global_weights: dict, cursor: Cursor,
                    base_weights: dict | None = None, skip: tuple[str, ...] = ()
                    ) -> WorkerUpdate | NoData:
        """`global_weights` are the tensors the run federates (all of them, or a LoRA
        adapter); `base_weights` the frozen rest, loaded once; `skip` the site's files
        recorded as damaged (never read again)."""
        if self.dirty:  # the last round trained here was not accepted: undo its state
            self.restore(round_index=self.committed_round)
        self.pending, self.quarantined = None, []
        replay_per_batch = self._replay_per_batch(round_index)
        new_per_batch = self.train.batch_size - replay_per_batch
        budget = new_token_budget(self.train, round_index=round_index,
                                  replay=self.replay is not None)
        try:
            ranges, sequences = self._read_new(cursor, tokens=budget, skip=frozenset(skip))
        except StorageUnavailable as exc:  # not the data's fault: sit out, read it later
            log.warning("site %s sits round %d out: %s", self.site.name, round_index, exc)
            return NoData(worker_id=self.site.name, round=round_index,
                          quarantined=tuple(self.quarantined), unavailable=str(exc))
        if not ranges:
            return NoData(worker_id=self.site.name, round=round_index,
                          quarantined=tuple(self.quarantined))
        plan = RoundPlan(round_index=round_index, new_per_batch=new_per_batch,
                         replay_per_batch=replay_per_batch,
                         increment_step=increment_step(cursor, first_file=ranges[0].file),
                         run_step=cursor.run_steps)
        sequences, holdout = split_holdout(sequences, self.train.early_stopping.holdout_fraction)
        if sequences.num_rows == 0:  # only blank rows: consumed, nothing to train
            return self._update(plan, {}, ranges, cursor, sequences, trained=Trained())
        received = self._load(global_weights, base_weights)
        started = time.perf_counter()
        self.dirty = True
        self.pending = sequences
        anchor = self._anchor(global_weights)
        trained = self._train(plan, sequences, holdout, anchor=anchor)
        trained = dataclasses.replace(trained, seconds=time.perf_counter() - started)
        if self.group.rank > 0:  # the group's weights are identical: rank 0 sends the delta
            return self._update(plan, {}, ranges, cursor, sequences, trained=trained)
        payload, self.pending_residual = pack_delta(
            self._delta(global_weights), kind=self.train.compression, residual=self.residual)
        return self._update(plan, payload, ranges, cursor, sequences, trained=trained,
                            holdout=holdout, received=received)

    def _load(self, global_weights: dict, base_weights: dict | None) -> int:
        """Load the round's weights; returns the bytes received (the base counts once)."""
        received = _nbytes(global_weights)
        if not self.base_loaded and base_weights is not None:
            ds.load_weights_(self.engine, base_weights, strict=False)
            self.base_loaded, received = True, received + _nbytes(base_weights)
        ds.load_weights_(self.engine, global_weights, strict=self.train.lora is None)
        return received

    def train_round_split(self, *, shards: list[list[str]], round_index: int,
                          global_weights: dict, cursor: Cursor, **extra) -> tuple:
        """`train_round` with the delta cut into `shards` (lists of tensor names). The
        coordinator calls it with Ray's num_returns=len(shards) + 1, so each slice is its own
        object that a reducer reads where it lies; the coordinator fetches only the first
        value, the update without its delta."""
        answer = self.train_round(round_index=round_index, global_weights=global_weights,
                                  cursor=cursor, **extra)
        if isinstance(answer, NoData) or not answer.delta:
            return (answer, *([None] * len(shards)))
        parts = split_payload(answer.delta, shards)
        return (dataclasses.replace(answer, delta={}), *parts)

    def _update(self, plan: RoundPlan, delta: dict | Packed, ranges: list[RowRange],
                cursor: Cursor, sequences: pa.Table, *, trained: Trained,
                holdout: pa.Table | None = None, received: int = 0) -> WorkerUpdate:
        consumed = merge_ranges(ranges)
        new_tokens = real_tokens(sequences)
        shared = sequences if self.local_replay is None else empty_sequences()
        losses = trained.losses
        return WorkerUpdate(
            worker_id=self.site.name, round=plan.round_index, delta=delta,
            # Repeated passes weigh in: the new tokens of every epoch actually run.
            weight=float(new_tokens * trained.epochs),
            consumed=consumed, cursor=cursor_after(consumed, cursor, steps=len(losses)),
            sequences=shared, quarantined=tuple(self.quarantined),
            metrics={"loss": float(np.mean(losses)) if losses else None,
                     "steps": len(losses), "epochs": trained.epochs,
                     "new_tokens": new_tokens, "replay_tokens": trained.replay_tokens,
                     "holdout_tokens": real_tokens(holdout) if holdout is not None else 0,
                     "holdout_loss": trained.holdout_losses,
                     "lr": trained.lrs, "train_seconds": trained.seconds,
                     "bytes_sent": payload_bytes(delta), "bytes_received": received,
                     "tokens_per_s": (new_tokens * trained.epochs + trained.replay_tokens)
                     / trained.seconds if trained.seconds else 0.0})

    def _replay_per_batch(self, round_index: int) -> int:
        return replay_per_batch(self.train, round_index=round_index,
                                replay=self.replay is not None)

    def _read_new(self, cursor: Cursor, *, tokens: int, skip: frozenset[str]
                  ) -> tuple[list[RowRange], pa.Table]:
        """Exactly `tokens` tokens from the cursor on (fewer only when the site runs out):
        a row that does not fit is split, and the next round continues inside it."""
        tok = self.tokenizer
        stream: list[int] = []
        ranges = []
        rows = iter_rows(self._files(skip), cursor, text_column=self.site.text_column,
                         max_row_chars=self.train.max_row_chars, skip=skip,
                         on_bad_file=self._quarantine)
        for row_range, text in rows:
            if len(stream) >= tokens:
                break
            if not text.strip():  # a blank row is consumed, but adds no tokens
                ranges.append(row_range)
                continue
            ids = self._row_tokens(row_range, text)
            start = cursor.token if (row_range.file, row_range.start_row) == (
                cursor.file, cursor.row) else 0
            end = min(len(ids), start + tokens - len(stream))
            stream.extend(ids[start:end])
            ranges.append(dataclasses.replace(row_range, start_token=start or None,
                                              end_token=end if end < len(ids) else None))
            self.open_row = (row_range.file, row_range.start_row, ids) if end < len(ids) else None
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        return ranges, pack_stream(stream, seq_len=self.train.seq_len, pad_id=pad)

    def _files(self, skip: frozenset[str]) -> list[DataFile]:
        """The site's files; one that is a link leading out of the site's folder is refused
        (recorded like a damaged file): a site trains on its own files only."""
        files = increment_files(self.site.path, settle_s=self.site.settle_s)
        for file in files:
            if file.name not in skip and file.escapes(self.site.path):
                self._quarantine(file, f"{file}: a symbolic link that leads out of the site's "
                                       "folder; copy the file in instead")
        return [f for f in files if f.name not in {q["name"] for q in self.quarantined}]

    def _row_tokens(self, row_range: RowRange, text: str) -> list[int]:
        """The row's tokens and its EOS separator (a row split last round is not tokenized
        again)."""
        if self.open_row is not None and self.open_row[:2] == (row_range.file,
                                                                  row_range.start_row):
            return self.open_row[2]
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return [*ids, self.tokenizer.eos_token_id]

    def _quarantine(self, path: DataFile, reason: str) -> None:
        """Record a damaged increment file; it is skipped, never moved or changed."""
        log.error("site %s: %s; skipping the file (it stays where it is)", self.site.name,
                  reason)
        entry = {"site": self.site.name, "file": str(path), "name": path.name,
                 "reason": reason, "size": None, "mtime": None, "sha256": None}
        try:
            info = path.info()
            entry["size"] = info.size
            entry["mtime"] = info.mtime.timestamp() if info.mtime else None
            entry["sha256"] = path.sha256()
        except OSError:
            pass  # unreadable bytes: recorded without their digest
        self.quarantined.append(entry)

    def _sample_replay(self, count: int, round_index: int) -> pa.Table:
        if count == 0 or self.replay is None:
            return empty_sequences()
        return self.replay(count, [self.train.seed, round_index, site_key(self.site.name)],
                           round_index=round_index)

    def _anchor(self, global_weights: dict) -> dict[str, torch.Tensor] | None:
        """The round's global weights on the device, for FedProx's proximal term."""
        if self.train.prox_mu <= 0:
            return None
        return {name: torch.as_tensor(global_weights[name]).to(self.device, p.dtype)
                for name, p in self.engine.module.named_parameters()
                if p.requires_grad and name in global_weights}

    def _train(self, plan: RoundPlan, new: pa.Table, holdout: pa.Table | None, *,
               anchor: dict | None) -> Trained:
        """Up to `max_epochs` passes over the round's new sequences (each with fresh replay),
        stopping early when the held-out loss stops improving."""
        stopping = self.train.early_stopping
        per_epoch = max(1, math.ceil(new.num_rows / plan.new_per_batch))
        replay = self._sample_replay(stopping.max_epochs * per_epoch * plan.replay_per_batch,
                                     plan.round_index)
        new_arrays = to_arrays(new)  # converted once, reused by every pass
        held_arrays = to_arrays(holdout) if holdout is not None else None
        losses, lrs, held_out, best, stale = [], [], [], math.inf, 0
        for epoch in range(stopping.max_epochs):
            rows = per_epoch * plan.replay_per_batch
            epoch_losses, epoch_lrs = self._epoch(
                plan, new_arrays, replay.slice(epoch * rows, rows), steps=per_epoch,
                first_step=len(losses), anchor=anchor)
            losses += epoch_losses
            lrs += epoch_lrs
            if held_arrays is None:
                continue
            held_out.append(mean_nll(self.engine.module, *held_arrays,
                                     batch_size=self.train.batch_size, device=self.device))
            best, stale = (held_out[-1], 0) if held_out[-1] < best else (best, stale + 1)
            if stale > stopping.patience:
                break
        replay_run = replay.slice(0, (epoch + 1) * per_epoch * plan.replay_per_batch)
        replay_tokens = real_tokens(replay_run)
        return Trained(losses=losses, lrs=lrs, epochs=epoch + 1, replay_tokens=replay_tokens,
                       holdout_losses=held_out)

    def _epoch(self, plan: RoundPlan, new: tuple[np.ndarray, np.ndarray], replay: pa.Table, *,
               steps: int, first_step: int, anchor: dict | None
               ) -> tuple[list[float], list[float]]:
        """One pass over the new sequences (ids, lengths); returns each step's data loss and
        learning rate."""
        new_ids, new_len = new
        rep_ids, rep_len = to_arrays(replay)
        per_new, per_rep = plan.new_per_batch, len(rep_ids) // steps if len(rep_ids) else 0
        self.engine.train()
        losses, lrs = [], []
        for step in range(steps):
            ids = new_ids[step * per_new:(step + 1) * per_new]
            lengths = new_len[step * per_new:(step + 1) * per_new]
            if per_rep:
                ids = np.concatenate([ids, rep_ids[step * per_rep:(step + 1) * per_rep]])
                lengths = np.concatenate([lengths, rep_len[step * per_rep:(step + 1) * per_rep]])
            lrs.append(self._set_lr(plan, first_step + step))
            loss = self._loss(ids, lengths)
            total = loss + self._proximal(anchor) if anchor is not None else loss
            self.engine.backward(total)
            self.engine.step()
            losses.append(float(loss.detach()))  # note: a device sync point, once per step
            if not math.isfinite(losses[-1]):
                log.warning("site %s: non-finite loss at step %d", self.site.name, step)
        return losses, lrs

    def _loss(self, ids: np.ndarray, lengths: np.ndarray) -> torch.Tensor:
        """The step's loss. In a group each rank takes its share of the batch's rows and
        divides its summed token loss by the whole batch's predicted tokens ÷ group size, so
        the gradients DeepSpeed averages over the ranks are exactly the whole batch's."""
        if self.group.size == 1:
            batch = {k: v.to(self.device) for k, v in batch_tensors(ids, lengths).items()}
            return self.engine(**batch).loss
        predicted = int(np.maximum(lengths.astype(np.int64) - 1, 0).sum())
        rows = np.array_split(np.arange(len(ids)), self.group.size)[self.group.rank]
        mine = batch_tensors(ids[rows], lengths[rows]) if len(rows) else _blank(ids[:1])
        batch = {k: v.to(self.device) for k, v in mine.items()}
        share = torch.tensor(max(predicted, 1) / self.group.size, device=self.device)
        return self.engine(**batch, num_items_in_batch=share).loss

    def _set_lr(self, plan: RoundPlan, step: int) -> float:
        lr = lr_at(self.train.lr_schedule, peak=self.train.lr,
                   increment_step=plan.increment_step + step, run_step=plan.run_step + step)
        for group in self.engine.optimizer.param_groups:
            group["lr"] = lr
        return lr

    def _proximal(self, anchor: dict) -> torch.Tensor:
        """FedProx: mu/2 * ||theta - theta_global||^2 pulls the site towards the round's global."""
        drift = sum(((p - anchor[name]) ** 2).sum()
                    for name, p in self.engine.module.named_parameters() if name in anchor)
        return 0.5 * self.train.prox_mu * drift


    def _delta(self, global_weights: dict) -> dict[str, np.ndarray]:
        delta = {}
        for name, param in ds.local_weights(self.engine).items():
            if self.train.lora is not None and not is_trained(name):
                continue  # the frozen A and base: no update to send
            base = torch.as_tensor(global_weights[name], dtype=torch.float32)
            delta[name] = (param.to("cpu", torch.float32) - base).numpy()
        return delta

    # ------------------------------------------------------------------ optimizer state

    def commit(self, *, round_index: int) -> None:
        """The coordinator accepted this worker's update of `round_index`: persist the
        optimizer state, keeping the last few so a resume from an older version finds its own."""
        if self.local_replay is not None and self.pending is not None:
            self.local_replay.add(self.site.name, self.pending, round_index=round_index)
        if self.pending is not None:  # the round trained: its residual is now the site's
            self.residual = self.pending_residual
        if self.state_dir is not None:
            final = self.state_dir / f"round-{round_index:04d}"
            tmp = self.state_dir / f".tmp-round-{round_index:04d}"
            shutil.rmtree(tmp, ignore_errors=True)
            ds.save_optimizer_state(self.engine.optimizer, tmp)
            rng.save(rng.capture(), tmp)  # what the site's next round starts drawing from
            if self.local_replay is not None:
                self.local_replay.save(str(tmp / "replay"))
            if self.residual is not None:
                save_file({k: torch.from_numpy(v) for k, v in self.residual.items()},
                          str(tmp / RESIDUAL))
            fsync_tree(tmp)
            shutil.rmtree(final, ignore_errors=True)
            tmp.rename(final)
            fsync_dir(self.state_dir)
            for old in sorted(self.state_dir.glob("round-*"))[:-KEEP_STATES]:
                shutil.rmtree(old, ignore_errors=True)
            if self.state_uri is not None:
                self._publish_state(final)
        self.committed_round, self.dirty, self.pending = round_index, False, None

    def _publish_state(self, final: Path) -> None:
        """Upload a committed state; its marker goes last, so a half-uploaded one is ignored."""
        upload_tree(final, join(self.state_uri, final.name))
        write_text(join(self.state_uri, final.name, STATE_DONE), "")
        for old in [n for n in list_names(self.state_uri) if n.startswith("round-")][
                :-KEEP_STATES]:
            delete_tree(join(self.state_uri, old))

    def _fetch_state(self, round_index: int) -> None:
        """Bring the newest published state at or before `round_index` here, if this node
        lacks it (a worker restarted on another node, or a resume with a fresh staging)."""
        names = [n for n in list_names(self.state_uri) if n.startswith("round-")
                 and int(n.split("-")[1]) <= round_index
                 and read_text(join(self.state_uri, n, STATE_DONE)) is not None]
        if names and not (self.state_dir / names[-1]).is_dir():
            download_tree(join(self.state_uri, names[-1]), self.state_dir / names[-1])
            (self.state_dir / names[-1] / STATE_DONE).unlink(missing_ok=True)

    def restore(self, *, round_index: int) -> int:
        """Load the newest optimizer state committed at or before `round_index` (a site that
        sat out later rounds last trained earlier), or start fresh if there is none.
        Returns the round whose state was loaded (0: fresh)."""
        saved = []
        if self.state_uri is not None and self.state_dir is not None:
            self._fetch_state(round_index)
        if self.state_dir is not None and self.state_dir.is_dir():
            saved = [p for p in sorted(self.state_dir.glob("round-*"))
                     if int(p.name.split("-")[1]) <= round_index]
        if saved:
            ds.load_optimizer_state(self.engine.optimizer, saved[-1])
            self.committed_round = int(saved[-1].name.split("-")[1])
        else:
            self.engine.optimizer.state.clear()  # a fresh AdamW: no moments yet
            self.committed_round = 0
        rng.restore((rng.load(saved[-1]) if saved else None) or self.initial_rng)
        if self.local_replay is not None:
            self.local_replay.sites = {}
            if saved and (saved[-1] / "replay").is_dir():
                self.local_replay.restore(str(saved[-1] / "replay"))
        self.residual = None
        if saved and (saved[-1] / RESIDUAL).is_file():
            self.residual = {k: v.numpy() for k, v in load_file(str(saved[-1] / RESIDUAL)).items()}
        self.dirty, self.pending = False, None
        return self.committed_round


def replay_per_batch(train: TrainSpec, *, round_index: int, replay: bool = True) -> int:
    """Replay sequences in each batch of a round (0 without a replay source)."""
    ratio = ratio_at(train.replay_ratio, train.replay_schedule, round_index=round_index)
    if not replay or ratio <= 0:
        return 0
    # The config check keeps this in [1, batch_size - 1]: every batch has new data.
    return round(ratio * train.batch_size)


def new_token_budget(train: TrainSpec, *, round_index: int, replay: bool = True) -> int:
    """New tokens one pass of a round takes: local_steps batches of their new share. The
    coordinator holds a site's self-reported weight to this (× the passes allowed)."""
    new_per_batch = train.batch_size - replay_per_batch(train, round_index=round_index,
                                                        replay=replay)
    return train.local_steps * new_per_batch * train.seq_len


@dataclass(frozen=True)
class RoundPlan:
    """Fixed for one round: batch composition and where the LR schedule starts."""

    round_index: int
    new_per_batch: int
    replay_per_batch: int
    increment_step: int
    run_step: int


@dataclass(frozen=True)
class Trained:
    """What the optimizer steps of one round did."""

    losses: list[float] = field(default_factory=list)
    lrs: list[float] = field(default_factory=list)
    epochs: int = 0
    replay_tokens: int = 0
    holdout_losses: list[float] = field(default_factory=list)
    seconds: float = 0.0


def split_holdout(sequences: pa.Table, fraction: float) -> tuple[pa.Table, pa.Table | None]:
    """The last `fraction` of a round's sequences, set aside to judge early stopping (at least
    one, and never all: a round of one sequence keeps it for training)."""
    if fraction <= 0 or sequences.num_rows < 2:
        return sequences, None
    count = min(sequences.num_rows - 1, max(1, round(fraction * sequences.num_rows)))
    keep = sequences.num_rows - count
    return sequences.slice(0, keep), sequences.slice(keep)


def _blank(ids: np.ndarray) -> dict[str, torch.Tensor]:
    """A row whose every label is masked: a rank with no rows this step still joins the
    collective, adding nothing to the loss."""
    batch = batch_tensors(ids, np.ones(len(ids), dtype=np.int64))
    batch["labels"] = torch.full_like(batch["labels"], -100)
    return batch


def _nbytes(weights: dict) -> int:
    return sum(np.asarray(a).nbytes for a in weights.values())
