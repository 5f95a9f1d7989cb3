"""The inner learning rate across rounds and increments.

`rewarm` (Ibrahim et al. 2024, "Simple and Scalable Strategies to Continually Pre-train LLMs"):
each new increment file of a site re-warms linearly from the floor to the peak `lr` over
`warmup_steps`, then re-decays with a cosine to the floor (`min_lr_ratio` × lr) over
`decay_steps`, and stays at the floor until the next increment begins.
`constant`: one linear warm-up at the start of the site's run, then the peak lr for good (the
plateau of an "infinite" schedule, which never needs to know how much data is still to come).

The position is counted in optimizer steps and carried in the site's cursor, which advances only
when the coordinator accepts the round, so it is the same after a merge, a rejected round or a
resume. Every worker applies the same function; a site re-warms at the first round that begins
in a new increment file (rows of a new file at the end of a round still get the old phase).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

SCHEDULE_KINDS = ("constant", "rewarm")


@dataclass(frozen=True)
class LrSchedule:
    kind: str = "constant"
    warmup_steps: int = 0
    # rewarm: steps of the cosine from peak to floor after each warm-up.
    decay_steps: int = 100
    min_lr_ratio: float = 0.1


def lr_at(schedule: LrSchedule, *, peak: float, increment_step: int, run_step: int) -> float:
    """The learning rate of one optimizer step. `increment_step` counts the site's steps since
    its current increment began, `run_step` since the run began (both from 0)."""
    floor = peak * schedule.min_lr_ratio
    if schedule.kind == "constant":
        if run_step < schedule.warmup_steps:
            return peak * (run_step + 1) / schedule.warmup_steps
        return peak
    if increment_step < schedule.warmup_steps:
        return floor + (peak - floor) * (increment_step + 1) / schedule.warmup_steps
    into_decay = min(increment_step - schedule.warmup_steps, schedule.decay_steps)
    cosine = 0.5 * (1.0 + math.cos(math.pi * into_decay / max(1, schedule.decay_steps)))
    return floor + (peak - floor) * cosine
