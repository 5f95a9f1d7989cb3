"""The replay store: per-site reservoir samples of token sequences, as Arrow.

The coordinator runs one as a Ray actor shared by all sites (`replay.scope: shared`); with
`replay.scope: site` each worker keeps its own, and its samples never leave the site.

Each site has its own reservoir (Algorithm R, seeded), so every sequence a site ever
offered has the same chance to be held, and the store never exceeds its capacity. Each held
sequence remembers the round it was added in. `sample` draws with replacement by the store's
`ReplayConfig` (sites pooled or balanced; uniform over age or weighted towards older rounds),
with an RNG seeded by the caller, so a (run, round, site) triple always gets the same sample.
Persisted as one Parquet file per site plus a JSON file with the counts and RNG states.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from workers.fsio import atomic_dir
from workers.packing import empty_sequences, sequences_table, to_arrays

BALANCE_MODES = ("pooled", "sites")


@dataclass(frozen=True)
class RatioStep:
    """From round `from_round` on, the replay ratio is `ratio`."""

    from_round: int
    ratio: float


@dataclass(frozen=True)
class ReplayConfig:
    """The `replay:` section of a run's config: how much of each batch is replayed, what the
    store holds and how samples are drawn from it.

    `balance`: "pooled" gives every held sequence the same chance (a site that contributed
    more is replayed more); "sites" gives every site the same share whatever it holds.
    `age_weight`: 0 draws uniformly over age; w > 0 weighs a sequence by (1 + its age in
    rounds)^w, so older increments, the ones most at risk of being forgotten, come back more.
    """

    ratio: float = 0.25
    capacity_tokens: int = 1_000_000
    # "shared": one store for all sites; "site": each worker keeps its own (data stays there).
    scope: str = "shared"
    balance: str = "pooled"
    age_weight: float = 0.0
    # The ratio from a round on, e.g. [{from_round: 10, ratio: 0.5}] after a known shift.
    schedule: list[RatioStep] = field(default_factory=list)


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

    def __len__(self) -> int:
        return len(self.lengths)

    def table(self) -> pa.Table:
        if self.ids is None or len(self) == 0:
            return empty_sequences()
        return sequences_table(self.ids, self.lengths)

    def weights(self, *, policy: ReplayConfig, round_index: int) -> np.ndarray:
        """Unnormalised sampling weight of each held sequence under `policy`."""
        age = np.maximum(round_index - self.rounds, 0).astype(np.float64)
        weights = (1.0 + age) ** policy.age_weight
        if policy.balance == "sites":
            weights /= weights.sum()  # every site's total mass is 1
        return weights


class ReplayStore:
    def __init__(self, *, capacity_per_site: int, seed: int,
                 policy: ReplayConfig | None = None) -> None:
        self.capacity_per_site = capacity_per_site
        self.seed = seed
        self.policy = policy or ReplayConfig()
        self.sites: dict[str, Reservoir] = {}

    def _reservoir(self, site: str) -> Reservoir:
        if site not in self.sites:
            self.sites[site] = Reservoir(capacity=self.capacity_per_site,
                                         seed=[self.seed, site_key(site)])
        return self.sites[site]

    def add(self, site: str, sequences: pa.Table, *, round_index: int) -> int:
        """Offer a site's sequences trained in `round_index`; returns how many it now holds."""
        reservoir = self._reservoir(site)
        if sequences.num_rows:
            reservoir.offer(*to_arrays(sequences), round_index=round_index)
        return len(reservoir)

    def sample(self, count: int, seed: list, *, round_index: int = 0) -> pa.Table:
        """`count` sequences drawn with replacement by the policy, as seen from `round_index`;
        empty if nothing is held yet."""
        held = [self.sites[name] for name in sorted(self.sites) if len(self.sites[name])]
        if count <= 0 or not held:
            return empty_sequences()
        pool = pa.concat_tables([r.table() for r in held])
        weights = np.concatenate(
            [r.weights(policy=self.policy, round_index=round_index) for r in held])
        picks = np.random.default_rng(seed).choice(
            pool.num_rows, size=count, p=weights / weights.sum())
        return pool.take(pa.array(picks))

    def sizes(self) -> dict[str, dict]:
        return {name: {"held": len(r), "seen": r.seen} for name, r in sorted(self.sites.items())}

    # ------------------------------------------------------------------ persistence

    def save(self, folder: str) -> None:
        """Write the store to `folder` atomically (temp folder, then rename)."""
        with atomic_dir(Path(folder)) as tmp:
            state = {"capacity_per_site": self.capacity_per_site, "seed": self.seed, "sites": {}}
            for name, reservoir in self.sites.items():
                table = reservoir.table().append_column("round", pa.array(reservoir.rounds))
                pq.write_table(table, tmp / f"{name}.parquet")
                state["sites"][name] = {"seen": reservoir.seen,
                                        "rng": reservoir.rng.bit_generator.state}
            (tmp / "state.json").write_text(json.dumps(state))

    def restore(self, folder: str) -> None:
        """Replace this store's content with the snapshot saved in `folder`."""
        folder = Path(folder)
        state = json.loads((folder / "state.json").read_text())
        self.capacity_per_site, self.seed = state["capacity_per_site"], state["seed"]
        self.sites = {}
        for name, site in state["sites"].items():
            reservoir = self._reservoir(name)
            reservoir.seen = site["seen"]
            reservoir.rng.bit_generator.state = site["rng"]
            table = pq.read_table(folder / f"{name}.parquet")
            if table.num_rows:
                ids, lengths = to_arrays(table)
                reservoir.ids, reservoir.lengths = ids.astype(np.int32), lengths.astype(np.int32)
                rounds = (table.column("round").to_numpy() if "round" in table.column_names
                          else np.zeros(table.num_rows))  # a snapshot from before ages were kept
                reservoir.rounds = rounds.astype(np.int32)
