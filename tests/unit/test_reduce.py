"""Sharded reduction's pieces without Ray: slicing the tensors, and each reducer's math
agreeing with the whole-model strategy and validation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from trainer.reduce import ShardReducer, plan_shards
from trainer.strategies import MergeConfig
from trainer.validate import delta_stats
from workers.compression import pack_delta, split_payload, unpack_delta

SHAPES = {"embed": (50, 8), "a": (8, 8), "b": (8,), "c": (16, 4), "head": (8, 50)}


def deltas(count: int, seed: int = 0) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{k: rng.standard_normal(s).astype(np.float32) for k, s in SHAPES.items()}
            for _ in range(count)]


def test_shards_cover_every_tensor_once_and_balance_sizes():
    shards = plan_shards(SHAPES, 2)
    assert sorted(n for s in shards for n in s) == sorted(SHAPES)
    sizes = [sum(int(np.prod(SHAPES[n])) for n in s) for s in shards]
    assert sizes == [400 + 64 + 8, 400 + 64]  # the big ones apart, each next into the lighter
    assert all(s == [n for n in SHAPES if n in s] for s in shards)  # model order kept
    assert len(plan_shards(SHAPES, 99)) == len(SHAPES)  # never an empty slice


@pytest.mark.parametrize("strategy", ["fedavg", "trimmed_mean", "median"])
@pytest.mark.parametrize("kind", ["fp32", "int8"])
def test_slices_combined_apart_equal_the_whole_combination(strategy, kind):
    updates = [pack_delta(d, kind=kind, residual=None)[0] for d in deltas(5)]
    weights = [1.0, 2.0, 3.0, 0.5, 4.0]
    whole = MergeConfig(strategy=strategy, trim_fraction=0.2).build().combine(
        [({k: torch.from_numpy(v) for k, v in unpack_delta(u).items()}, w)
         for u, w in zip(updates, weights, strict=True)],
        out={k: torch.zeros(s) for k, s in SHAPES.items()})
    for names in plan_shards(SHAPES, 3):
        reducer = ShardReducer(shapes={n: SHAPES[n] for n in names},
                               merge=MergeConfig(strategy=strategy, trim_fraction=0.2))
        index = plan_shards(SHAPES, 3).index(names)
        parts = [(split_payload(u, plan_shards(SHAPES, 3))[index], {}) for u in updates]
        combined = reducer.combine(weights, *parts)
        assert sorted(combined) == sorted(names)
        for name in names:
            assert torch.equal(torch.from_numpy(combined[name]), whole[name])


def test_slice_stats_add_up_to_the_whole_delta_and_find_a_nan():
    delta = deltas(1)[0]
    shards = plan_shards(SHAPES, 2)
    reducers = [ShardReducer(shapes={n: SHAPES[n] for n in s}, merge=MergeConfig())
                for s in shards]
    stats = [r.inspect((p, {}))[0] for r, p in zip(reducers, split_payload(delta, shards), strict=True)]
    assert sum(s.sum_squares for s in stats) == pytest.approx(
        delta_stats(delta, SHAPES).sum_squares, rel=1e-6)
    delta["b"][3] = np.nan
    problems = [r.inspect((p, {}))[0].problem
                for r, p in zip(reducers, split_payload(delta, shards), strict=True)]
    assert [p is not None for p in problems] == ["b" in s for s in shards]
    assert "'b'" in next(p for p in problems if p)


def test_a_slice_with_a_wrong_shape_is_named():
    reducer = ShardReducer(shapes={"b": (8,)}, merge=MergeConfig())
    [stats] = reducer.inspect(({"b": np.zeros(9, dtype=np.float32)}, {}))
    assert "'b'" in stats.problem and "(9,)" in stats.problem
