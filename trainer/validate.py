"""Update validation before merging: layout, finiteness, and a norm bound relative to the others.

A rejected update is never merged; its site's rows stay unconsumed and are trained again.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from workers.types import WorkerUpdate


@dataclass(frozen=True)
class DeltaStats:
    """What validation needs to know of one delta: what is wrong with it (None: nothing),
    and Σ x² over its values (a sharded merge adds the slices' sums)."""

    problem: str | None
    sum_squares: float


def validate_updates(
    updates: Sequence[WorkerUpdate], *, shapes: Mapping[str, tuple[int, ...]],
    max_norm_ratio: float, stats: Mapping[str, DeltaStats] | None = None,
) -> tuple[list[WorkerUpdate], dict[str, str]]:
    """(accepted, {worker_id: reason}) for this round's updates.

    An update whose delta norm exceeds `max_norm_ratio` × the median norm of the other
    updates is rejected (with a single update there is nothing to compare against).
    `stats` are given when the deltas were inspected where they lie (sharded merging);
    otherwise they are computed here from each update's delta. Updates without stats (weight 0:
    only blank rows were consumed, no delta) pass.
    """
    if stats is None:
        stats = {u.worker_id: delta_stats(u.delta, shapes) for u in updates
                 if u.weight or u.delta}
    rejected = {site: s.problem for site, s in stats.items() if s.problem}
    norms = {site: math.sqrt(s.sum_squares) for site, s in stats.items() if not s.problem}
    for worker_id, norm in norms.items():
        others = [n for other, n in norms.items() if other != worker_id]
        if others and norm > max_norm_ratio * statistics.median(others):
            rejected[worker_id] = (
                f"delta norm {norm:.4g} is over merge.max_norm_ratio={max_norm_ratio:g} × the "
                f"median of the other updates ({statistics.median(others):.4g})")
    accepted = [u for u in updates if u.worker_id not in rejected]
    return accepted, rejected


def delta_stats(delta: Mapping[str, np.ndarray], shapes: Mapping[str, tuple]) -> DeltaStats:
    problem = _layout_problem(delta, shapes) or _finite_problem(delta)
    if problem:
        return DeltaStats(problem, math.nan)
    return DeltaStats(None, sum(float(np.dot(a.ravel(), a.ravel())) for a in delta.values()))


def delta_norm(delta: Mapping[str, np.ndarray]) -> float:
    return float(np.sqrt(sum(float(np.dot(a.ravel(), a.ravel())) for a in delta.values())))


def _layout_problem(delta: Mapping[str, np.ndarray], shapes: Mapping[str, tuple]) -> str | None:
    if set(delta) != set(shapes):
        missing = sorted(set(shapes) - set(delta))[:3]
        extra = sorted(set(delta) - set(shapes))[:3]
        return f"delta has the wrong tensors (missing {missing}, unexpected {extra})"
    for name, shape in shapes.items():
        if tuple(delta[name].shape) != tuple(shape):
            return f"delta tensor {name!r} has shape {tuple(delta[name].shape)}, expected {shape}"
    return None


def _finite_problem(delta: Mapping[str, np.ndarray]) -> str | None:
    for name, array in delta.items():
        if not np.isfinite(array).all():
            return f"delta tensor {name!r} holds NaN or Inf"
    return None
