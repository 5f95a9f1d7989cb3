"""Values that cross actor boundaries: frozen dataclasses, plain data only."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa


@dataclass(frozen=True)
class RowRange:
    """Rows [start_row, end_row) of one increment file."""

    file: str
    start_row: int
    end_row: int

    def to_dict(self) -> dict:
        return {"file": self.file, "start_row": self.start_row, "end_row": self.end_row}


@dataclass(frozen=True)
class Cursor:
    """The next unconsumed row of a site: file name (within the site) and row index.

    `file=None` means nothing has been consumed yet.
    """

    file: str | None = None
    row: int = 0

    def to_dict(self) -> dict:
        return {"file": self.file, "row": self.row}

    @classmethod
    def from_dict(cls, data: dict) -> "Cursor":
        return cls(file=data.get("file"), row=int(data.get("row", 0)))


@dataclass(frozen=True)
class SiteSpec:
    name: str
    path: str
    text_column: str = "text"


@dataclass(frozen=True)
class TrainSpec:
    """What one worker needs to know to train: batch shape, steps, optimizer, DeepSpeed."""

    local_steps: int
    batch_size: int
    seq_len: int
    lr: float
    weight_decay: float
    replay_ratio: float
    deepspeed: dict
    seed: int = 0
    max_row_chars: int = 1_000_000
    # Site-local replay: the worker keeps its own store of this many sequences (0: shared).
    local_replay_capacity: int = 0


@dataclass(frozen=True)
class WorkerUpdate:
    """What a worker sends back after one round.

    `delta` is θ_local − θ_global in fp32 on CPU; `weight` the number of NEW tokens trained.
    `consumed` lists the row ranges trained this round; `cursor` is where the site
    continues if the update is accepted. `sequences` are the new token sequences trained
    (offered to the replay store if the update is accepted).
    """

    worker_id: str
    round: int
    delta: dict[str, np.ndarray]
    weight: float
    consumed: tuple[RowRange, ...]
    cursor: Cursor
    sequences: pa.Table
    metrics: dict = field(default_factory=dict)
    quarantined: tuple[dict, ...] = ()  # {file, reason} of increment files set aside


@dataclass(frozen=True)
class NoData:
    """A worker's answer when its site has no unconsumed rows left."""

    worker_id: str
    round: int
    quarantined: tuple[dict, ...] = ()
