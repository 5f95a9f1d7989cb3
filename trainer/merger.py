"""The merger: validate a round's updates, combine them, take the outer step on the global
weights, and hold what the quality gate needs to take that step back.

`LocalMerger` combines whole deltas on the coordinator; `ShardedMerger` has reducer actors
combine one slice of every delta each, where the slices lie (trainer/reduce.py). Both work
the same from the round loop's side: `validate`, then `propose` (the candidate is now the
global model), then `accept` or `reject` (the previous global model and outer state return).
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Mapping, MutableMapping, Sequence

import torch

from trainer.downlink import RESIDUAL as DOWNLINK_STATE
from trainer.downlink import DownlinkSender
from trainer.reduce import ShardedMerge
from trainer.strategies import MergeConfig
from trainer.validate import DeltaStats, validate_updates
from workers.types import WorkerUpdate

Parts = Mapping[str, Sequence]  # site -> the object refs of its delta's slices (sharded)


class LocalMerger:
    """Whole deltas, combined here."""

    shards: tuple[tuple[str, ...], ...] = ()  # workers send their delta whole

    def __init__(self, merge: MergeConfig, *, weights: MutableMapping[str, torch.Tensor],
                 keep_previous: bool) -> None:
        self.merge, self.weights = merge, weights
        self.strategy = merge.build()
        self.shapes = {name: tuple(t.shape) for name, t in weights.items()}
        self.keep_previous = keep_previous  # a quality gate may send the candidate back
        self.previous: tuple | None = None
        # merge.downlink: the outer step ends with the global change packed for the workers.
        self.downlink = None if merge.downlink == "fp32" else DownlinkSender(
            kind=merge.downlink, weights=weights, keep=merge.downlink_keep)

    def validate(self, updates: list[WorkerUpdate], parts: Parts
                 ) -> tuple[list[WorkerUpdate], dict[str, str]]:
        """(accepted, {site: reason}): layout, finiteness, and the norm bound."""
        return validate_updates(updates, shapes=self.shapes,
                                max_norm_ratio=self.merge.max_norm_ratio,
                                stats=self._stats([u for u in updates if u.weight > 0], parts))

    def propose(self, updates: list[WorkerUpdate], parts: Parts, *,
                scale: float = 1.0) -> float:
        """Take the outer step with the updates that carry weight, their combined delta
        times `scale`; returns its seconds."""
        if self.keep_previous:
            self.snapshot()
        started = time.perf_counter()
        self._step([u for u in updates if u.weight > 0], parts, scale=scale)
        if self.downlink is not None:
            self.downlink.settle()
        return time.perf_counter() - started

    def accept(self) -> None:
        self.previous = None

    def reject(self) -> None:
        """The global model and the outer state go back to before `propose`."""
        self.restore()

    def snapshot(self) -> None:
        """Hold the global model and outer state as they are now (asynchronous merging takes
        this at every evaluated version, and a rejection goes back to it)."""
        self.previous = ({k: v.clone() for k, v in self.weights.items()},
                         {k: v.clone() for k, v in self.state_dict().items()},
                         self.downlink.mark if self.downlink else None)

    def restore(self) -> None:
        weights, outer, mark = self.previous
        for name, tensor in self.weights.items():
            tensor.copy_(weights[name])
        self.load_state_dict(outer)
        if self.downlink is not None:
            self.downlink.rewind(mark)
        # The snapshot stays: the model is that point again, and the next rejection (with
        # no accepted version between) goes back to it too.

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The outer state: the strategy's, and the downlink's error feedback."""
        own = self.downlink.state_dict() if self.downlink else {}
        return {**self.strategy.state_dict(), **own}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if self.downlink is not None:
            self.downlink.load_state_dict(state)
        self.strategy.load_state_dict({k: v for k, v in state.items()
                                       if not k.startswith(DOWNLINK_STATE)})

    def shutdown(self) -> None:
        pass

    def _stats(self, updates: list[WorkerUpdate], parts: Parts) -> dict[str, DeltaStats] | None:
        return None  # validate_updates reads each whole delta itself

    def _step(self, updates: list[WorkerUpdate], parts: Parts, *, scale: float) -> None:
        with warnings.catch_warnings():  # object-store arrays are read-only; we only read them
            warnings.simplefilter("ignore", UserWarning)
            deltas = [({k: torch.from_numpy(v) for k, v in u.delta.items()}, u.weight)
                      for u in updates]
            self.strategy.aggregate(self.weights, deltas, scale=scale)


class ShardedMerger(LocalMerger):
    """Deltas in slices (merge.reducers), inspected and combined by reducer actors; the
    coordinator holds one combined slice at a time."""

    def __init__(self, merge: MergeConfig, *, weights: MutableMapping[str, torch.Tensor],
                 keep_previous: bool) -> None:
        super().__init__(merge, weights=weights, keep_previous=keep_previous)
        self.reducers = ShardedMerge(shapes=self.shapes, count=merge.reducers, merge=merge)
        self.shards = tuple(tuple(names) for names in self.reducers.shards)

    def _stats(self, updates: list[WorkerUpdate], parts: Parts) -> dict[str, DeltaStats]:
        return self.reducers.stats({u.worker_id: parts[u.worker_id] for u in updates})

    def _step(self, updates: list[WorkerUpdate], parts: Parts, *, scale: float) -> None:
        self.reducers.apply(self.strategy, self.weights,
                            {u.worker_id: parts[u.worker_id] for u in updates},
                            {u.worker_id: u.weight for u in updates}, scale=scale)

    def shutdown(self) -> None:
        self.reducers.shutdown()


def build_merger(merge: MergeConfig, *, weights: MutableMapping[str, torch.Tensor],
                 keep_previous: bool = False) -> LocalMerger:
    """The merger `merge.reducers` asks for: local (0) or sharded (N reducers)."""
    kind = ShardedMerger if merge.reducers else LocalMerger
    return kind(merge, weights=weights, keep_previous=keep_previous)
