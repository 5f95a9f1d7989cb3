"""The replay store: stratified reservoir samples of token sequences, as Arrow.

The coordinator runs one as a Ray actor shared by all sites (`replay.scope: shared`); with
`replay.scope: site` each worker keeps its own, and its samples never leave the site.

Sequences are held by stratum: each increment file is its own stratum (or a user-named group
of files, `replay.groups`; or, with `replay.strata: site`, each site). Every stratum has its
own reservoir (Algorithm R, seeded), and the store's capacity is split evenly among the strata
it holds — when a new increment arrives, the older strata give up sequences uniformly at
random, so the oldest knowledge keeps a fixed share of memory however much new data comes.
`sample` draws with replacement by a stated rule (`replay.balance`): every stratum the same
share ("strata"), shares in a user-given mix ("mix"), every site the same share ("sites"), or
every held sequence the same chance ("pooled"); `replay.age_weight` tilts towards older
material, and the forgetting budget's per-stratum weights (trainer/control.py) multiply on
top. The caller seeds the RNG, so a (run, round, site) triple always gets the same sample.
Persisted as one Parquet file per stratum plus a JSON file with the counts and RNG states.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from workers.fsio import atomic_dir
from workers.packing import empty_sequences, sequences_table, to_arrays

BALANCE_MODES = ("strata", "mix", "sites", "pooled")
STRATA_KINDS = ("file", "site")
STRATUM = "stratum"  # the column of a sequences table naming each sequence's stratum


@dataclass(frozen=True)
class RatioStep:
    """From round `from_round` on, the replay ratio is `ratio`."""

    from_round: int
    ratio: float


@dataclass(frozen=True)
class ReplayConfig:
    """The `replay:` section of a run's config: how much of each batch is replayed, what the
    store holds and how samples are drawn from it (see the module's docstring)."""

    ratio: float = 0.25
    capacity_tokens: int = 1_000_000
    # "shared": one store for all sites; "site": each worker keeps its own (data stays there).
    scope: str = "shared"
    strata: str = "file"  # what a stratum is: an increment file (or group), or a whole site
    # Named groups of files, each one stratum: {name: ["site/pattern*.parquet", ...]}.
    groups: dict[str, list[str]] = field(default_factory=dict)
    balance: str = "strata"
    mix: dict[str, float] = field(default_factory=dict)  # balance "mix": stratum -> share
    # 0: uniform over age; w > 0 weighs by (1 + age in rounds)^w, favouring older material.
    age_weight: float = 0.0
    # The ratio from a round on, e.g. [{from_round: 10, ratio: 0.5}] after a known shift.
    schedule: list[RatioStep] = field(default_factory=list)
    # The forgetting budget (trainer/control.py): None turns it off.
    target_forgetting: float | None = None
    max_ratio: float = 0.5

    def stratum(self, site: str, file: str) -> str:
        """The stratum a site's increment file belongs to."""
        if self.strata == "site":
            return site
        key = f"{site}/{file}"
        return next((name for name, patterns in self.groups.items()
                     if any(fnmatch.fnmatchcase(key, p) for p in patterns)), key)


def ratio_at(replay: ReplayConfig, *, round_index: int) -> float:
    """The replay ratio of a round: the last schedule step at or before it, else the base
    ratio (e.g. more replay after a known distribution shift)."""
    ratio = replay.ratio
    for step in sorted(replay.schedule, key=lambda s: s.from_round):
        if step.from_round <= round_index:
            ratio = step.ratio
    return ratio


def site_key(site: str) -> int:
    """A stable integer for a site name, to seed its random streams."""
    return int.from_bytes(site.encode()[:8].ljust(8, b"\0"), "little")


def _name_key(name: str) -> int:
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "little")


def with_strata(sequences: pa.Table, strata: list[str]) -> pa.Table:
    """A sequences table with each sequence's stratum named."""
    return sequences.append_column(STRATUM, pa.array(strata, pa.string()))


class Reservoir:
    """A uniform sample of at most `capacity` sequences from everything offered."""

    def __init__(self, *, capacity: int, seed: list[int]) -> None:
        self.capacity = capacity
        self.seen = 0
        self.rng = np.random.default_rng(seed)
        self.ids: np.ndarray | None = None
        self.lengths = np.zeros(0, dtype=np.int32)
        self.rounds = np.zeros(0, dtype=np.int32)  # the round each held sequence arrived in

    def offer(self, ids: np.ndarray, lengths: np.ndarray, *, round_index: int) -> None:
        if self.ids is None:
            self.ids = np.zeros((0, ids.shape[1]), dtype=np.int32)
        for row in range(len(ids)):
            self.seen += 1
            if len(self.lengths) < self.capacity:
                self.ids = np.concatenate([self.ids, ids[row:row + 1].astype(np.int32)])
                self.lengths = np.append(self.lengths, np.int32(lengths[row]))
                self.rounds = np.append(self.rounds, np.int32(round_index))
                continue
            slot = int(self.rng.integers(0, self.seen))
            if slot < self.capacity:
                self.ids[slot] = ids[row]
                self.lengths[slot] = lengths[row]
                self.rounds[slot] = round_index

    def shrink(self, capacity: int) -> None:
        """Hold at most `capacity`: a uniform subset of what is held stays uniform."""
        self.capacity = capacity
        if len(self) > capacity:
            keep = np.sort(self.rng.choice(len(self), size=capacity, replace=False))
            self.ids, self.lengths, self.rounds = (self.ids[keep], self.lengths[keep],
                                                   self.rounds[keep])

    def __len__(self) -> int:
        return len(self.lengths)

    def table(self) -> pa.Table:
        if self.ids is None or len(self) == 0:
            return empty_sequences()
        return sequences_table(self.ids, self.lengths)

    def age_weights(self, *, age_weight: float, round_index: int) -> np.ndarray:
        age = np.maximum(round_index - self.rounds, 0).astype(np.float64)
        return (1.0 + age) ** age_weight


class ReplayStore:
    def __init__(self, *, capacity: int, seed: int, policy: ReplayConfig | None = None) -> None:
        self.capacity = capacity  # sequences, split evenly among the strata
        self.seed = seed
        self.policy = policy or ReplayConfig()
        self.strata: dict[str, Reservoir] = {}
        self.site_of: dict[str, str] = {}  # stratum -> the site it came from

    def add(self, site: str, sequences: pa.Table, *, round_index: int) -> int:
        """Offer a site's sequences trained in `round_index` (each to its stratum, the site
        itself when they name none); returns how many the store now holds."""
        if not sequences.num_rows:
            return self.held()
        names = (sequences.column(STRATUM).to_pylist() if STRATUM in sequences.column_names
                 else [site] * sequences.num_rows)
        for name in dict.fromkeys(names):  # in order of first appearance: deterministic
            rows = sequences.filter(pc.equal(pa.array(names), name))
            self._reservoir(name, site=site).offer(*to_arrays(rows), round_index=round_index)
        return self.held()

    def _reservoir(self, name: str, *, site: str) -> Reservoir:
        if name not in self.strata:
            self.strata[name] = Reservoir(capacity=self.capacity,
                                          seed=[self.seed, _name_key(name)])
            self.site_of[name] = site
            share = max(1, self.capacity // len(self.strata))
            for reservoir in self.strata.values():  # the newcomer takes an equal share
                reservoir.shrink(share)
        return self.strata[name]

    def clear(self) -> None:
        self.strata, self.site_of = {}, {}

    def held(self) -> int:
        return sum(len(r) for r in self.strata.values())

    def sample(self, count: int, seed: list, *, round_index: int = 0,
               weights: Mapping[str, float] | None = None) -> pa.Table:
        """`count` sequences drawn with replacement by the store's rule, as seen from
        `round_index`; `weights` multiply strata's shares (the forgetting budget). Empty if
        nothing is held yet."""
        names = [n for n in sorted(self.strata) if len(self.strata[n])]
        if count <= 0 or not names:
            return empty_sequences()
        pool = pa.concat_tables([self.strata[n].table() for n in names])
        mass = np.concatenate([self._mass(n, names, round_index, weights or {}) for n in names])
        picks = np.random.default_rng(seed).choice(pool.num_rows, size=count,
                                                   p=mass / mass.sum())
        return pool.take(pa.array(picks))

    def _mass(self, name: str, names: list[str], round_index: int,
              weights: Mapping[str, float]) -> np.ndarray:
        """Each held sequence's unnormalised chance of being drawn."""
        p, reservoir = self.policy, self.strata[name]
        per_sequence = reservoir.age_weights(age_weight=p.age_weight, round_index=round_index)
        if p.balance == "pooled":  # every held sequence, by its own age
            return per_sequence * weights.get(name, 1.0)
        if p.balance == "sites":  # every site's total mass is 1, then the budget's weight
            site = self.site_of[name]
            total = sum(self.strata[n].age_weights(age_weight=p.age_weight,
                                                   round_index=round_index).sum()
                        for n in names if self.site_of[n] == site)
            return per_sequence / total * weights.get(name, 1.0)
        # "strata" and "mix": the stratum's mass (by rule, by its age — rounds since it
        # arrived — and by the budget's weight), spread evenly over what it holds. A mix
        # that gives none of the held strata a share (yet) replays them alike, not nothing.
        mixed = p.balance == "mix" and any(p.mix.get(n, 0.0) > 0 for n in names)
        share = p.mix.get(name, 0.0) if mixed else 1.0
        age = max(round_index - int(reservoir.rounds.min()), 0)
        mass = share * (1.0 + age) ** p.age_weight * weights.get(name, 1.0)
        return np.full(len(reservoir), mass / len(reservoir))

    def shares(self, *, round_index: int, weights: Mapping[str, float] | None = None
               ) -> dict[str, float]:
        """Each stratum's expected share of a sample."""
        names = [n for n in sorted(self.strata) if len(self.strata[n])]
        mass = {n: self._mass(n, names, round_index, weights or {}).sum() for n in names}
        total = sum(mass.values()) or 1.0
        return {n: m / total for n, m in mass.items()}

    def sizes(self) -> dict[str, dict]:
        return {name: {"held": len(r), "seen": r.seen} for name, r in sorted(self.strata.items())}

    # ------------------------------------------------------------------ persistence

    def save(self, folder: str) -> None:
        """Write the store to `folder` atomically (temp folder, then rename)."""
        with atomic_dir(Path(folder)) as tmp:
            state = {"capacity": self.capacity, "seed": self.seed, "strata": []}
            for index, (name, reservoir) in enumerate(self.strata.items()):
                table = reservoir.table().append_column("round", pa.array(reservoir.rounds))
                pq.write_table(table, tmp / f"stratum-{index:04d}.parquet")
                state["strata"].append({"name": name, "site": self.site_of[name],
                                        "capacity": reservoir.capacity, "seen": reservoir.seen,
                                        "rng": reservoir.rng.bit_generator.state})
            (tmp / "state.json").write_text(json.dumps(state))

    def restore(self, folder: str) -> None:
        """Replace this store's content with the snapshot saved in `folder`."""
        folder = Path(folder)
        state = _current(json.loads((folder / "state.json").read_text()))
        self.capacity, self.seed = state["capacity"], state["seed"]
        self.strata, self.site_of = {}, {}
        for index, entry in enumerate(state["strata"]):
            name = entry["name"]
            reservoir = self.strata[name] = Reservoir(capacity=entry["capacity"],
                                                      seed=[self.seed, _name_key(name)])
            self.site_of[name] = entry["site"]
            reservoir.seen = entry["seen"]
            reservoir.rng.bit_generator.state = entry["rng"]
            table = pq.read_table(folder / entry.get("file", f"stratum-{index:04d}.parquet"))
            if table.num_rows:
                ids, lengths = to_arrays(table)
                reservoir.ids, reservoir.lengths = ids.astype(np.int32), lengths.astype(np.int32)
                rounds = (table.column("round").to_numpy() if "round" in table.column_names
                          else np.zeros(table.num_rows))  # a snapshot from before ages were kept
                reservoir.rounds = rounds.astype(np.int32)


def _current(state: dict) -> dict:
    """A snapshot in today's layout; one written before strata (one reservoir per site, each
    of `capacity_per_site`) reads as one stratum per site."""
    if "strata" in state:
        return state
    sites = state["sites"]
    return {"capacity": state["capacity_per_site"] * max(1, len(sites)), "seed": state["seed"],
            "strata": [{"name": name, "site": name, "capacity": state["capacity_per_site"],
                        "seen": site["seen"], "rng": site["rng"], "file": f"{name}.parquet"}
                       for name, site in sites.items()]}
