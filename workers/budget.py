"""A round's batch composition: how many of each batch's sequences are replayed, and how
many new tokens one pass takes. The worker plans its batches with these, and the coordinator
holds a site's self-report to the same numbers."""

from __future__ import annotations

from workers.replay import ratio_at
from workers.types import TrainSpec


def replay_per_batch(train: TrainSpec, *, round_index: int, replay: bool = True) -> int:
    """Replay sequences in each batch of a round (0 without a replay source)."""
    ratio = ratio_at(train.replay, round_index=round_index)
    if not replay or ratio <= 0:
        return 0
    # The config check keeps this in [1, batch_size - 1]: every batch has new data.
    return round(ratio * train.worker.batch_size)


def new_token_budget(train: TrainSpec, *, round_index: int, replay: bool = True) -> int:
    """New tokens one pass of a round takes: local_steps batches of their new share."""
    w = train.worker
    new_per_batch = w.batch_size - replay_per_batch(train, round_index=round_index,
                                                    replay=replay)
    return w.local_steps * new_per_batch * w.seq_len
