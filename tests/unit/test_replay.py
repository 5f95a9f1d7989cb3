"""The replay store: uniform reservoirs, bounded size, seeded sampling by policy (site balance,
age), the ratio schedule, Parquet round trip."""

import numpy as np
import pyarrow as pa

from workers.packing import sequences_table, to_arrays
from workers.replay import RatioStep, ReplayConfig, ReplayStore, Reservoir, ratio_at


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
            reservoir.offer(ids, lengths, round_index=batch + 1)
        assert len(reservoir) == capacity
        counts[reservoir.ids[:, 0]] += 1
    expected = trials * capacity / stream
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    # 49 degrees of freedom: the 0.999 quantile is about 85.4.
    assert chi2 < 85.4, f"chi-square {chi2:.1f}: reservoir is not uniform"


def test_store_is_bounded_per_site():
    store = ReplayStore(capacity_per_site=8, seed=0)
    for round_index in range(5):
        store.add("a", sequences(round_index * 20, 20), round_index=round_index)
        store.add("b", sequences(1000 + round_index * 3, 3), round_index=round_index)
    assert store.sizes() == {"a": {"held": 8, "seen": 100}, "b": {"held": 8, "seen": 15}}


def test_sampling_is_reproducible_by_seed():
    store = ReplayStore(capacity_per_site=100, seed=0)
    store.add("a", sequences(0, 50), round_index=1)
    first = store.sample(16, [1, 2, 3])
    assert first.equals(store.sample(16, [1, 2, 3]))
    assert not first.equals(store.sample(16, [1, 2, 4]))
    assert store.sample(0, [1]).num_rows == 0
    assert ReplayStore(capacity_per_site=4, seed=0).sample(5, [1]).num_rows == 0


def first_ids(table: pa.Table) -> np.ndarray:
    return to_arrays(table)[0][:, 0]


def test_balanced_sites_get_equal_shares_whatever_they_hold():
    pooled = ReplayStore(capacity_per_site=100, seed=0)
    balanced = ReplayStore(capacity_per_site=100, seed=0, policy=ReplayConfig(balance="sites"))
    for store in (pooled, balanced):
        store.add("big", sequences(0, 80), round_index=1)
        store.add("small", sequences(1000, 20), round_index=1)
    small_share = {name: float((first_ids(store.sample(4000, [1], round_index=2)) >= 1000).mean())
                   for name, store in (("pooled", pooled), ("balanced", balanced))}
    assert abs(small_share["pooled"] - 0.2) < 0.03  # in proportion to what is held
    assert abs(small_share["balanced"] - 0.5) < 0.03


def test_age_weight_favours_older_increments():
    store = ReplayStore(capacity_per_site=100, seed=0, policy=ReplayConfig(age_weight=1.0))
    store.add("a", sequences(0, 10), round_index=1)  # age 5 at round 6: weight 6
    store.add("a", sequences(1000, 10), round_index=5)  # age 1: weight 2
    old_share = float((first_ids(store.sample(4000, [2], round_index=6)) < 1000).mean())
    assert abs(old_share - 0.75) < 0.03
    uniform = ReplayStore(capacity_per_site=100, seed=0)
    uniform.sites = store.sites
    assert abs(float((first_ids(uniform.sample(4000, [2], round_index=6)) < 1000).mean())
               - 0.5) < 0.03


def test_ratio_schedule_applies_from_its_round_on():
    replay = ReplayConfig(ratio=0.25, schedule=[RatioStep(5, 0.5), RatioStep(2, 0.125)])
    assert [ratio_at(replay, round_index=r) for r in (1, 2, 4, 5, 9)] == [
        0.25, 0.125, 0.125, 0.5, 0.5]
    assert ratio_at(ReplayConfig(ratio=0.25), round_index=3) == 0.25


def test_save_and_restore_continue_identically(tmp_path):
    store = ReplayStore(capacity_per_site=5, seed=3, policy=ReplayConfig(age_weight=2.0))
    store.add("a", sequences(0, 30), round_index=1)
    store.save(str(tmp_path / "snap"))
    restored = ReplayStore(capacity_per_site=1, seed=99, policy=ReplayConfig(age_weight=2.0))
    restored.restore(str(tmp_path / "snap"))
    assert sorted(p.name for p in (tmp_path / "snap").iterdir()) == ["a.parquet", "state.json"]
    for target in (store, restored):  # the RNG state travels too: later adds agree
        target.add("a", sequences(100, 30), round_index=2)
    assert store.sample(20, [5], round_index=3).equals(restored.sample(20, [5], round_index=3))
    assert (restored.sites["a"].rounds == store.sites["a"].rounds).all()
    assert store.sizes() == restored.sizes()
