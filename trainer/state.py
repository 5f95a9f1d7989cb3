"""What a run carries from round to round (and across a resume), and what one round gathered."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from trainer.control import Control
from workers.types import Cursor, SiteConfig, WorkerUpdate


class RunError(RuntimeError):
    """The run cannot go on; the message says why and what to do."""


@dataclass
class RunState:
    """The run's position: saved in every version's manifest, restored by resume."""

    round: int = 0
    version: int = 0  # the newest version number used (accepted or rejected)
    accepted: int = 0  # the newest accepted version: the global model
    cursors: dict[str, Cursor] = field(default_factory=dict)
    exhausted: set[str] = field(default_factory=set)  # no rows left
    down: set[str] = field(default_factory=set)  # failed too many rounds, or cannot be placed
    missed: dict[str, int] = field(default_factory=dict)  # rounds failed in a row, per site
    skipped: dict[str, set[str]] = field(default_factory=dict)  # site -> damaged file names
    down_reasons: dict[str, str] = field(default_factory=dict)  # why a site is left out
    control: Control = field(default_factory=Control)  # replay and lr steering
    sequence: dict[str, int] = field(default_factory=dict)  # async: each site's tasks merged

    def active(self, sites: Sequence[SiteConfig]) -> list[str]:
        """Sites still asked to train: not out of rows, not left out."""
        return [s.name for s in sites if s.name not in self.exhausted | self.down]

    def watching(self, sites: Sequence[SiteConfig]) -> bool:
        """Does a watched site that is still up remain (new files may come)?"""
        return any(s.watch and s.name not in self.down for s in sites)

    def leave_out(self, reasons: dict[str, str]) -> None:
        self.down.update(reasons)
        self.down_reasons.update(reasons)


@dataclass(frozen=True)
class RoundResult:
    """What a round's sites answered, after validation."""

    updates: list[WorkerUpdate]  # accepted for merging
    failures: dict[str, str]  # site -> why no update came (dead actor, error, deadline)
    idle: list[str]  # sites with no new rows
    rejected: dict[str, str] = field(default_factory=dict)  # site -> why its update was refused
    quarantined: list[dict] = field(default_factory=list)  # damaged files found (skipped)
    unavailable: dict[str, str] = field(default_factory=dict)  # site -> storage fault (sat out)

    @property
    def stalled(self) -> bool:
        """Every site that had work sat out on a storage fault: nothing to merge, nothing
        failed — wait and try again (sites that stay stalled go down, worker.max_missed_rounds)."""
        return bool(self.unavailable) and not (self.updates or self.failures or self.rejected)

    @property
    def quiet(self) -> bool:
        """Every site answered that it has nothing new: nothing to merge or count."""
        return not (self.updates or self.failures or self.rejected or self.unavailable)

    @property
    def reasons(self) -> dict[str, str]:
        """Why each site that gave no usable update did not."""
        return {**self.failures, **self.rejected, **self.unavailable}
