"""Values that cross actor boundaries: frozen dataclasses, plain data only."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from workers.compression import Packed
from workers.lora import LoraSpec
from workers.replay import ReplayConfig
from workers.schedule import LrSchedule


@dataclass(frozen=True)
class RowRange:
    """Rows [start_row, end_row) of one increment file. A range that starts inside its first
    row carries `start_token` (the first token of that row it covers); one that ends inside
    its last row carries `end_token` (the first token of that row it does not cover). Token
    offsets count the row's tokens followed by its end-of-text separator."""

    file: str
    start_row: int
    end_row: int
    start_token: int | None = None
    end_token: int | None = None

    def to_dict(self) -> dict:
        data = {"file": self.file, "start_row": self.start_row, "end_row": self.end_row}
        if self.start_token is not None:
            data["start_token"] = self.start_token
        if self.end_token is not None:
            data["end_token"] = self.end_token
        return data


@dataclass(frozen=True)
class Cursor:
    """Where a site continues: the last file consumed (within the site), the next row, and the
    next token of that row (0: the row has not been started).

    `file=None` means nothing has been consumed yet. `steps` counts the optimizer steps taken
    since the site's current increment (`file`) began and `run_steps` since the run began: the
    learning-rate schedule's position, accepted together with the rows.
    """

    file: str | None = None
    row: int = 0
    steps: int = 0
    run_steps: int = 0
    token: int = 0

    def to_dict(self) -> dict:
        return {"file": self.file, "row": self.row, "token": self.token, "steps": self.steps,
                "run_steps": self.run_steps}

    @classmethod
    def from_dict(cls, data: dict) -> Cursor:
        return cls(file=data.get("file"), row=int(data.get("row", 0)),
                   token=int(data.get("token", 0)), steps=int(data.get("steps", 0)),
                   run_steps=int(data.get("run_steps", 0)))


MAX_ROW_CHARS = 1_000_000  # a row longer than this marks its file as damaged


@dataclass(frozen=True)
class SiteWorker:
    """A site's own values for the worker settings that describe its hardware and pace
    (`sites[].worker`); unset ones are the run's `worker:` values."""

    local_steps: int | None = None
    batch_size: int | None = None
    num_cpus: float | None = None
    num_gpus: float | None = None
    deepspeed: str | dict | None = None

    def set(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if v is not None}


@dataclass(frozen=True)
class SiteConfig:
    """One entry of the config's `sites:` — where a site's increments live and what its
    workers ask Ray for."""

    name: str
    path: str
    text_column: str = "text"
    # Ray resources the site's workers also need, e.g. {"site_berlin": 1} to pin them to the
    # node that holds its data (start that node with `ray start --resources`).
    resources: dict[str, float] = field(default_factory=dict)
    # Workers training this site together as one DeepSpeed data-parallel group (e.g. its
    # node's GPUs); the site still returns one update per round.
    num_workers: int = 1
    # Keep looking for new files (a site with nothing new sits a round out); a file is taken
    # once it has not changed for settle_s seconds (write it under a hidden name, then rename).
    watch: bool = False
    settle_s: float = 5.0
    # This site's own local_steps, batch_size, num_cpus, num_gpus or deepspeed config (a
    # node with 8 GPUs next to one with 1); the rest comes from the run's `worker:`.
    worker: SiteWorker = field(default_factory=SiteWorker)

    @property
    def settle_window(self) -> float:
        """Seconds a file must have been left alone before it is read (0: a fixed folder)."""
        return self.settle_s if self.watch else 0.0


@dataclass(frozen=True)
class EarlyStopping:
    """Repeat a round's new data for up to `max_epochs` passes, stopping once the loss on a
    held-out slice of it (`holdout_fraction` of the round's sequences, never trained) has not
    improved for `patience` passes. `holdout_fraction` 0 turns the check off."""

    max_epochs: int = 1
    holdout_fraction: float = 0.0
    patience: int = 0


@dataclass(frozen=True)
class GroupSpec:
    """A worker's place in its site's data-parallel group (sites[].num_workers > 1): the
    group trains one model together, each rank on its share of every batch."""

    rank: int
    size: int
    master_addr: str
    master_port: int


AUTO_MMAP_THRESHOLD = 65536  # bytes: blocks above it are mmapped, and unmapped when freed


@dataclass(frozen=True)
class WorkerConfig:
    """The config's `worker:` section: how each site trains a round, and what its actors
    ask Ray for."""

    local_steps: int = 8
    batch_size: int = 4
    seq_len: int = 256
    lr: float = 2e-5
    weight_decay: float = 0.0
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    # glibc's MALLOC_MMAP_THRESHOLD_ for the worker processes: a byte count, "glibc" (its own,
    # which rises as large blocks are freed and then keeps ZeRO-3's gathered-and-released
    # parameters in the heap, so host memory per rank stops dividing by the ranks), or "auto"
    # (65536 for ZeRO-3 sites on CPU, whose parameters live in host memory; glibc's
    # elsewhere, as the fixed threshold costs speed: benchmarks/zero3_throughput.py).
    malloc_mmap_threshold: int | str = "auto"

    def mmap_threshold(self, *, zero_stage: int) -> int | None:
        """The threshold this worker's processes start with (None: glibc's own)."""
        if self.malloc_mmap_threshold == "auto":
            return AUTO_MMAP_THRESHOLD if zero_stage == 3 and not self.num_gpus else None
        return None if self.malloc_mmap_threshold == "glibc" else int(
            self.malloc_mmap_threshold)
    # A path to a DeepSpeed JSON config, the config inline, or None for the default.
    deepspeed: str | dict | None = None
    # Consecutive failed rounds after which a site is reported and left out.
    max_missed_rounds: int = 3
    # A file holding a longer row is damaged (guards against runaway lines).
    max_row_chars: int = MAX_ROW_CHARS
    lr_schedule: LrSchedule = field(default_factory=LrSchedule)
    # FedProx's mu: mu/2 * ||theta - theta_global||^2 keeps each site near the round's global.
    prox_mu: float = 0.0
    early_stopping: EarlyStopping = field(default_factory=EarlyStopping)


@dataclass(frozen=True)
class TrainSpec:
    """What one worker is told about training: the config's worker and replay sections as
    they are, and the run-wide settings that shape a round."""

    worker: WorkerConfig
    replay: ReplayConfig
    deepspeed: dict  # the DeepSpeed config, read from its file if it was given as a path
    seed: int = 0
    # How the delta travels: "fp32", "bf16" or "int8" (workers/compression.py).
    compression: str = "fp32"
    error_feedback: bool = True  # carry what compression dropped into the next delta
    # LoRA adapters with a shared frozen A (workers/lora.py); None: full fine-tuning.
    lora: LoraSpec | None = None
    # Site-local replay (replay.scope: site): the worker keeps a store of this many sequences.
    local_replay_capacity: int = 0
    # Committed states kept (run.keep_versions: as long as the versions' weights, so a
    # retraction can restart from before any of them); None: all.
    keep_states: int | None = None


@dataclass(frozen=True)
class RoundTask:
    """One site's round as the coordinator planned it. The schedule's position travels in the
    cursor (`steps`, `run_steps`); `max_new_tokens` is the plan's bound on the new tokens of
    one pass, which the coordinator holds the answer to. The round's weights travel beside the
    task, as top-level arguments, so Ray hands each worker the object store's copy."""

    round_index: int
    cursor: Cursor
    max_new_tokens: int
    skip: tuple[str, ...] = ()  # the site's files recorded as damaged: never read again
    shards: tuple[tuple[str, ...], ...] = ()  # sharded merging: the delta's slices
    # The forgetting budget's and the gate's steering (trainer/control.py): this round's
    # replay ratio (None: the config's), replay weights by stratum, and peak-lr factor.
    replay_ratio: float | None = None
    replay_weights: tuple[tuple[str, float], ...] = ()
    lr_scale: float = 1.0


@dataclass(frozen=True)
class WorkerUpdate:
    """What a worker sends back after one round.

    `delta` is θ_local − θ_global in fp32 on CPU (or its compressed `Packed` form, which the
    coordinator unpacks on receipt); `weight` the number of NEW tokens trained.
    `consumed` lists the row ranges trained this round; `cursor` is where the site
    continues if the update is accepted. `sequences` are the new token sequences trained
    (offered to the replay store if the update is accepted).
    """

    worker_id: str
    round: int
    delta: dict[str, np.ndarray] | Packed
    weight: float
    consumed: tuple[RowRange, ...]
    cursor: Cursor
    sequences: pa.Table
    metrics: dict = field(default_factory=dict)
    quarantined: tuple[dict, ...] = ()  # records of damaged increment files (skipped)
    # A rank of a ZeRO site sends only the slices of the fp32 masters it owns: here, for each
    # tensor sent as a slice, (its start in the flattened tensor, the tensor's shape).
    layout: dict[str, tuple[int, tuple[int, ...]]] = field(default_factory=dict)


@dataclass(frozen=True)
class NoData:
    """A worker's answer when its site has no unconsumed rows left, or (`unavailable` says
    why) when its storage kept failing: then it sits the round out and reads the rows later."""

    worker_id: str
    round: int
    quarantined: tuple[dict, ...] = ()
    unavailable: str | None = None
