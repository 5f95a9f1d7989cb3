"""The replay store: uniform reservoirs, bounded size, seeded sampling, Parquet round trip."""

import numpy as np
import pyarrow as pa

from workers.packing import sequences_table, to_arrays
from workers.replay import ReplayStore, Reservoir


def sequences(start: int, count: int, length: int = 4) -> pa.Table:
    ids = np.arange(start, start + count, dtype=np.int32).repeat(length).reshape(count, length)
    return sequences_table(ids, np.full(count, length, dtype=np.int32))


def test_reservoir_keeps_every_item_with_equal_probability():
    stream, capacity, trials = 50, 10, 4000
    counts = np.zeros(stream)
    for trial in range(trials):
        reservoir = Reservoir(capacity=capacity, seed=[7, trial])
        for batch in range(5):  # offered in several rounds, as sites do
            ids, lengths = to_arrays(sequences(batch * 10, 10))
            reservoir.offer(ids, lengths)
        assert len(reservoir) == capacity
        counts[reservoir.ids[:, 0]] += 1
    expected = trials * capacity / stream
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    # 49 degrees of freedom: the 0.999 quantile is about 85.4.
    assert chi2 < 85.4, f"chi-square {chi2:.1f}: reservoir is not uniform"


def test_store_is_bounded_per_site():
    store = ReplayStore(capacity_per_site=8, seed=0)
    for round_index in range(5):
        store.add("a", sequences(round_index * 20, 20))
        store.add("b", sequences(1000 + round_index * 3, 3))
    assert store.sizes() == {"a": {"held": 8, "seen": 100}, "b": {"held": 8, "seen": 15}}


def test_sampling_is_reproducible_by_seed():
    store = ReplayStore(capacity_per_site=100, seed=0)
    store.add("a", sequences(0, 50))
    first = store.sample(16, [1, 2, 3])
    assert first.equals(store.sample(16, [1, 2, 3]))
    assert not first.equals(store.sample(16, [1, 2, 4]))
    assert store.sample(0, [1]).num_rows == 0
    assert ReplayStore(capacity_per_site=4, seed=0).sample(5, [1]).num_rows == 0


def test_save_and_restore_continue_identically(tmp_path):
    store = ReplayStore(capacity_per_site=5, seed=3)
    store.add("a", sequences(0, 30))
    store.save(str(tmp_path / "snap"))
    restored = ReplayStore(capacity_per_site=1, seed=99)
    restored.restore(str(tmp_path / "snap"))
    assert sorted(p.name for p in (tmp_path / "snap").iterdir()) == ["a.parquet", "state.json"]
    for target in (store, restored):  # the RNG state travels too: later adds agree
        target.add("a", sequences(100, 30))
    assert store.sample(20, [5]).equals(restored.sample(20, [5]))
    assert store.sizes() == restored.sizes()
