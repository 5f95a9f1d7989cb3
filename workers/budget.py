"""A round's batch composition: how many of each batch's sequences are replayed, and how
many new tokens one pass takes. The worker plans its batches with these, and the coordinator
holds a site's self-report to the same numbers."""

from __future__ import annotations

from workers.replay import ratio_at
from workers.types import TrainSpec


def replay_per_batch(train: TrainSpec, *, round_index: int, replay: bool = True,
                     ratio: float | None = None) -> int:
    """Replay sequences in each batch of a round (0 without a replay source); `ratio`, when
    the coordinator steers it, instead of the config's."""
    ratio = ratio_at(train.replay, round_index=round_index) if ratio is None else ratio
    if not replay or ratio <= 0:
        return 0
    # Every batch keeps at least one replay and one new sequence (the config's ratios are
    # checked to; a steered ratio is held to it here).
    batch = train.worker.batch_size
    return min(max(round(ratio * batch), 1), batch - 1)


def new_token_budget(train: TrainSpec, *, round_index: int, replay: bool = True,
                     ratio: float | None = None) -> int:
    """New tokens one pass of a round takes: local_steps batches of their new share."""
    w = train.worker
    new_per_batch = w.batch_size - replay_per_batch(train, round_index=round_index,
                                                    replay=replay, ratio=ratio)
    return w.local_steps * new_per_batch * w.seq_len
