"""Update validation before merging: the site's self-report against its round's plan, then
layout, finiteness, and a norm bound relative to the others.

A rejected update is never merged; its site's rows stay unconsumed and are trained again.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from trainer.merge import finite_problem, layout_problem
from workers.increments import FORMATS, cursor_after
from workers.packing import real_tokens
from workers.storage import is_uri, list_files
from workers.types import Cursor, RowRange, WorkerUpdate


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
    problem = layout_problem(delta, shapes) or finite_problem(delta)
    if problem:
        return DeltaStats(problem, math.nan)
    return DeltaStats(None, sum(float(np.dot(a.ravel(), a.ravel())) for a in delta.values()))


def delta_norm(delta: Mapping[str, np.ndarray]) -> float:
    return float(np.sqrt(sum(float(np.dot(a.ravel(), a.ravel())) for a in delta.values())))


def report_problem(update: WorkerUpdate, *, previous: Cursor, budget: int, local_steps: int,
                   max_epochs: int, listed: set[str] | None, shared_sequences: bool
                   ) -> str | None:
    """Why a site's self-report does not fit its round's plan (None: it fits).

    The rows must continue exactly where the site's cursor stood and only move forward,
    through files the site can list (when the coordinator can list them too); the new cursor
    must be where those rows end; the new tokens may not exceed the planned `budget`, nor the
    passes `max_epochs`; the merge weight must be the new tokens × the passes; and the new
    sequences, when they travel (shared replay), must hold exactly the tokens claimed."""
    m = update.metrics
    problem = _rows_problem(update.consumed, previous, listed)
    if problem:
        return problem
    expected = cursor_after(update.consumed, previous, steps=m.get("steps", 0))
    if update.cursor != expected:
        return f"cursor {update.cursor.to_dict()} is not where its rows end ({expected.to_dict()})"
    new, epochs, steps = m.get("new_tokens", 0), m.get("epochs", 1), m.get("steps", 0)
    if not 0 <= new <= budget:
        return f"claims {new} new tokens; its round was planned for at most {budget}"
    if not 0 <= epochs <= max_epochs or (new and not epochs) or not (
            0 <= steps <= local_steps * epochs):
        return (f"claims {steps} steps in {epochs} passes; the plan allows {local_steps} steps "
                f"a pass and {max_epochs} passes")
    if update.weight != new * epochs:
        return f"merge weight {update.weight:g} is not its new tokens × passes ({new} × {epochs})"
    if shared_sequences and real_tokens(update.sequences) != new:
        return (f"claims {new} new tokens but sent sequences holding "
                f"{real_tokens(update.sequences)}")
    return None


def _rows_problem(ranges: Sequence[RowRange], previous: Cursor, listed: set[str] | None
                  ) -> str | None:
    if not ranges:
        return "an update without rows"
    position = (previous.file, previous.row, previous.token)
    for r in ranges:
        if listed is not None and r.file not in listed:
            return f"claims rows of {r.file!r}, which is not among the site's files"
        start = (r.file, r.start_row, r.start_token or 0)
        new_file = position[0] is None or r.file > position[0]
        if start != position and not (new_file and start[1:] == (0, 0)):
            return (f"rows {r.to_dict()} do not continue from {position} (a cursor only moves "
                    "forward, without gaps)")
        end = (r.file, r.end_row, 0) if r.end_token is None else (r.file, r.end_row - 1,
                                                                  r.end_token)
        if end[1:] <= start[1:]:
            return f"an empty or backward range {r.to_dict()}"
        position = end
    return None


def listed_names(location: str) -> set[str] | None:
    """The site's file names as the coordinator sees them, for a site on object storage
    (s3://, gs://, ...); None otherwise, and the check is skipped: a local path may name
    another folder on the coordinator's node than on the site's, and storage that is down
    cannot say."""
    if not is_uri(location):
        return None
    try:  # one look, no retries: a slow store must not hold the round up
        return {f.name for f in list_files(location, suffixes=set(FORMATS))}
    except (OSError, ValueError):
        return None
