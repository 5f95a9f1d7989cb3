"""A Worker that sends a poisoned update in one round: NaN, or a delta 10^6 times too large.
The tests ship it to Ray workers by value (it is not installed)."""

from __future__ import annotations

import dataclasses

import numpy as np

from workers.worker import Worker


def poisoned_worker(*, site: str, round_index: int, kind: str) -> type:
    """A Worker class whose `site` sends a bad delta in `round_index` (kind: nan | huge)."""

    class PoisonWorker(Worker):
        def train_round(self, *, round_index: int, global_weights, cursor):
            update = super().train_round(round_index=round_index, global_weights=global_weights,
                                         cursor=cursor)
            if self.site.name != site or round_index != poison_round:
                return update
            if kind == "nan":
                delta = {k: np.full_like(v, np.nan) for k, v in update.delta.items()}
            else:
                delta = {k: v * 1e6 for k, v in update.delta.items()}
            return dataclasses.replace(update, delta=delta)

    poison_round = round_index
    return PoisonWorker


def slow_worker(*, site: str, round_index: int, seconds: float) -> type:
    """A Worker class whose `site` takes `seconds` longer in `round_index` (a straggler)."""

    class SlowWorker(Worker):
        def train_round(self, *, round_index: int, global_weights, cursor):
            if self.site.name == site and round_index == slow_round:
                import time
                time.sleep(seconds)
            return super().train_round(round_index=round_index, global_weights=global_weights,
                                       cursor=cursor)

    slow_round = round_index
    return SlowWorker
