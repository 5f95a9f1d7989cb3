"""The optimizer steps of one round on a worker's DeepSpeed engine: up to `max_epochs` passes
over the round's new sequences, each batch topped up with replay, the learning rate set at
every step from the schedule, FedProx's pull towards the round's global weights, and early
stopping on a held-out slice."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import torch

from workers.model import mean_nll
from workers.packing import batch_tensors, empty_sequences, real_tokens, to_arrays
from workers.schedule import lr_at
from workers.types import GroupSpec, TrainSpec

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RoundPlan:
    """Fixed for one round: batch composition and where the LR schedule starts."""

    round_index: int
    new_per_batch: int
    replay_per_batch: int
    increment_step: int
    run_step: int
    lr_scale: float = 1.0  # the gate lowers the peak lr after a rejection
    replay_weights: dict[str, float] = field(default_factory=dict)  # by stratum


@dataclass(frozen=True)
class Trained:
    """What the optimizer steps of one round did."""

    losses: list[float] = field(default_factory=list)
    lrs: list[float] = field(default_factory=list)
    epochs: int = 0
    replay_tokens: int = 0
    holdout_losses: list[float] = field(default_factory=list)
    seconds: float = 0.0


class RoundSteps:
    def __init__(self, *, engine, train: TrainSpec, group: GroupSpec, site: str,
                 sample_replay: Callable[[int, int, dict], pa.Table]) -> None:
        self.engine, self.train, self.group, self.site = engine, train, group, site
        self.sample_replay = sample_replay  # (count, round_index, weights) -> sequences
        self.device = engine.device

    def run(self, plan: RoundPlan, new: pa.Table, holdout: pa.Table | None, *,
            anchor: dict | None) -> Trained:
        """Up to `max_epochs` passes over the round's new sequences (each with fresh replay),
        stopping early when the held-out loss stops improving."""
        stopping = self.train.worker.early_stopping
        per_epoch = max(1, math.ceil(new.num_rows / plan.new_per_batch))
        rows = per_epoch * plan.replay_per_batch
        replay = (self.sample_replay(stopping.max_epochs * rows, plan.round_index,
                                     plan.replay_weights) if rows else empty_sequences())
        new_arrays = to_arrays(new)  # converted once, reused by every pass
        held_arrays = to_arrays(holdout) if holdout is not None else None
        losses, lrs, held_out, best, stale = [], [], [], math.inf, 0
        for epoch in range(stopping.max_epochs):
            epoch_losses, epoch_lrs = self._epoch(
                plan, new_arrays, replay.slice(epoch * rows, rows), steps=per_epoch,
                first_step=len(losses), anchor=anchor)
            losses += epoch_losses
            lrs += epoch_lrs
            if held_arrays is None:
                continue
            held_out.append(mean_nll(self.engine.module, *held_arrays,
                                     batch_size=self.train.worker.batch_size, device=self.device))
            best, stale = (held_out[-1], 0) if held_out[-1] < best else (best, stale + 1)
            if stale > stopping.patience:
                break
        replay_tokens = real_tokens(replay.slice(0, (epoch + 1) * rows))
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
                log.warning("site %s: non-finite loss at step %d", self.site, step)
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
        w = self.train.worker
        lr = lr_at(w.lr_schedule, peak=w.lr * plan.lr_scale,
                   increment_step=plan.increment_step + step, run_step=plan.run_step + step)
        for group in self.engine.optimizer.param_groups:
            group["lr"] = lr
        return lr

    def anchor(self, global_weights: dict) -> dict[str, torch.Tensor] | None:
        """The round's global weights on the device, for FedProx's proximal term."""
        if self.train.worker.prox_mu <= 0:
            return None
        return {name: torch.as_tensor(global_weights[name]).to(self.device, p.dtype)
                for name, p in self.engine.module.named_parameters()
                if p.requires_grad and name in global_weights}

    def _proximal(self, anchor: dict) -> torch.Tensor:
        """FedProx: mu/2 * ||theta - theta_global||^2 pulls the site towards the round's global."""
        drift = sum(((p - anchor[name]) ** 2).sum()
                    for name, p in self.engine.module.named_parameters() if name in anchor)
        return 0.5 * self.train.worker.prox_mu * drift


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
