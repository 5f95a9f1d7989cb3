"""The replay store: uniform reservoirs, strata that keep their share of memory and of every
sample however much new data comes, the stated sampling rules, the ratio schedule, Parquet
round trip."""

import json

import numpy as np
import pyarrow as pa
import pytest

from workers.packing import sequences_table, to_arrays
from workers.replay import (
    RatioStep,
    ReplayConfig,
    ReplayStore,
    Reservoir,
    ratio_at,
    with_strata,
)


def sequences(start: int, count: int, length: int = 4, stratum: str | None = None) -> pa.Table:
    ids = np.arange(start, start + count, dtype=np.int32).repeat(length).reshape(count, length)
    table = sequences_table(ids, np.full(count, length, dtype=np.int32))
    return with_strata(table, [stratum] * count) if stratum else table


def first_ids(table: pa.Table) -> np.ndarray:
    return to_arrays(table)[0][:, 0]


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


def test_every_stratum_keeps_an_equal_share_of_a_bounded_store():
    """Increments arrive one per round, the newest far larger: memory stays within capacity,
    and the first increment still holds its share, not what is left over."""
    store = ReplayStore(capacity=60, seed=0)
    for k, size in enumerate([10, 200, 400]):
        store.add("a", sequences(k * 1000, size, stratum=f"a/{k}.parquet"), round_index=k + 1)
    sizes = store.sizes()
    assert sum(s["held"] for s in sizes.values()) <= 60
    assert [sizes[f"a/{k}.parquet"]["held"] for k in range(3)] == [10, 20, 20]


def test_equal_split_gives_the_oldest_stratum_the_same_share_as_the_newest():
    store = ReplayStore(capacity=1000, seed=0)
    store.add("a", sequences(0, 20, stratum="a/old.jsonl"), round_index=1)
    store.add("a", sequences(1000, 300, stratum="a/new.jsonl"), round_index=5)
    drawn = first_ids(store.sample(6000, [1], round_index=6))
    assert (drawn < 1000).mean() == pytest.approx(0.5, abs=0.03)
    pooled = ReplayStore(capacity=1000, seed=0, policy=ReplayConfig(balance="pooled"))
    pooled.strata, pooled.site_of = store.strata, store.site_of
    assert (first_ids(pooled.sample(6000, [1], round_index=6)) < 1000).mean() == pytest.approx(
        20 / 320, abs=0.02)  # pooled: in proportion to what is held


def test_a_user_mix_age_and_budget_weights_set_the_shares():
    strata = {"a/1.jsonl": 0, "a/2.jsonl": 1000, "b/1.jsonl": 2000}
    mix = ReplayConfig(balance="mix", mix={"a/1.jsonl": 3.0, "a/2.jsonl": 1.0})
    store = ReplayStore(capacity=300, seed=0, policy=mix)
    for index, (name, start) in enumerate(strata.items()):
        store.add(name[0], sequences(start, 50, stratum=name), round_index=index + 1)
    assert store.shares(round_index=4) == pytest.approx(
        {"a/1.jsonl": 0.75, "a/2.jsonl": 0.25, "b/1.jsonl": 0.0})
    equal = ReplayStore(capacity=300, seed=0, policy=ReplayConfig(age_weight=1.0))
    equal.strata, equal.site_of = store.strata, store.site_of
    ages = {"a/1.jsonl": 4, "a/2.jsonl": 3, "b/1.jsonl": 2}  # (1 + age)^1 at round 4
    total = sum(ages.values())
    assert equal.shares(round_index=4) == pytest.approx({k: v / total for k, v in ages.items()})
    plain = ReplayStore(capacity=300, seed=0)
    plain.strata, plain.site_of = store.strata, store.site_of
    steered = plain.shares(round_index=4, weights={"b/1.jsonl": 2.0})
    assert steered == pytest.approx({"a/1.jsonl": 0.25, "a/2.jsonl": 0.25, "b/1.jsonl": 0.5})
    drawn = first_ids(plain.sample(8000, [3], round_index=4, weights={"b/1.jsonl": 2.0}))
    assert (drawn >= 2000).mean() == pytest.approx(0.5, abs=0.03)


def test_sites_balance_and_a_file_to_group_mapping():
    groups = ReplayConfig(groups={"old": ["speeches/17*", "speeches/18*"]})
    assert groups.stratum("speeches", "1790s.parquet") == "old"
    assert groups.stratum("speeches", "1990s.parquet") == "speeches/1990s.parquet"
    assert ReplayConfig(strata="site").stratum("speeches", "x.parquet") == "speeches"
    store = ReplayStore(capacity=400, seed=0, policy=ReplayConfig(balance="sites"))
    store.add("big", sequences(0, 60, stratum="big/1"), round_index=1)
    store.add("big", sequences(100, 60, stratum="big/2"), round_index=1)
    store.add("small", sequences(1000, 20, stratum="small/1"), round_index=1)
    assert sum(v for k, v in store.shares(round_index=2).items()
               if k.startswith("small")) == pytest.approx(0.5)


def test_the_budgets_weights_also_steer_the_sites_balance():
    store = ReplayStore(capacity=400, seed=0, policy=ReplayConfig(balance="sites"))
    store.add("a", sequences(0, 40, stratum="a/1"), round_index=1)
    store.add("a", sequences(100, 40, stratum="a/2"), round_index=1)
    store.add("b", sequences(1000, 40, stratum="b/1"), round_index=1)
    assert store.shares(round_index=2, weights={"a/1": 3.0}) == pytest.approx(
        {"a/1": 0.75 / 1.5, "a/2": 0.25 / 1.5, "b/1": 0.5 / 1.5})


def test_a_mix_naming_no_held_stratum_replays_them_alike():
    store = ReplayStore(capacity=400, seed=0,
                        policy=ReplayConfig(balance="mix", mix={"c/later.jsonl": 1.0}))
    store.add("a", sequences(0, 40, stratum="a/1"), round_index=1)
    store.add("b", sequences(1000, 40, stratum="b/1"), round_index=1)
    assert store.shares(round_index=2) == pytest.approx({"a/1": 0.5, "b/1": 0.5})
    assert store.sample(16, [1], round_index=2).num_rows == 16


def test_sampling_is_reproducible_by_seed():
    store = ReplayStore(capacity=100, seed=0)
    store.add("a", sequences(0, 50), round_index=1)
    first = store.sample(16, [1, 2, 3])
    assert first.equals(store.sample(16, [1, 2, 3]))
    assert not first.equals(store.sample(16, [1, 2, 4]))
    assert store.sample(0, [1]).num_rows == 0
    assert ReplayStore(capacity=4, seed=0).sample(5, [1]).num_rows == 0


def test_ratio_schedule_applies_from_its_round_on():
    replay = ReplayConfig(ratio=0.25, schedule=[RatioStep(5, 0.5), RatioStep(2, 0.125)])
    assert [ratio_at(replay, round_index=r) for r in (1, 2, 4, 5, 9)] == [
        0.25, 0.125, 0.125, 0.5, 0.5]
    assert ratio_at(ReplayConfig(ratio=0.25), round_index=3) == 0.25


def test_save_and_restore_continue_identically(tmp_path):
    store = ReplayStore(capacity=10, seed=3, policy=ReplayConfig(age_weight=2.0))
    store.add("a", sequences(0, 30, stratum="a/1"), round_index=1)
    store.add("a", sequences(100, 30, stratum="a/2"), round_index=2)
    store.save(str(tmp_path / "snap"))
    restored = ReplayStore(capacity=1, seed=99, policy=ReplayConfig(age_weight=2.0))
    restored.restore(str(tmp_path / "snap"))
    for target in (store, restored):  # the RNG states travel too: later adds agree
        target.add("a", sequences(200, 30, stratum="a/3"), round_index=3)
    assert store.sample(20, [5], round_index=4).equals(restored.sample(20, [5], round_index=4))
    assert store.sizes() == restored.sizes()


def test_a_snapshot_from_before_strata_restores_one_stratum_per_site(tmp_path):
    folder = tmp_path / "old"
    folder.mkdir()
    import pyarrow.parquet as pq

    table = sequences(0, 5).append_column("round", pa.array(np.ones(5, dtype=np.int32)))
    pq.write_table(table, folder / "speeches.parquet")
    rng = np.random.default_rng(0).bit_generator.state
    (folder / "state.json").write_text(json.dumps(
        {"capacity_per_site": 8, "seed": 0, "sites": {"speeches": {"seen": 5, "rng": rng}}}))
    store = ReplayStore(capacity=1, seed=1)
    store.restore(str(folder))
    assert store.sizes() == {"speeches": {"held": 5, "seen": 5}}
