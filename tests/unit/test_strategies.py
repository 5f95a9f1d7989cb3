"""Merge strategies: each outer step checked against a reference, state round trips."""

import pytest
import torch

from trainer.merge import median, trimmed_mean
from trainer.strategies import STRATEGIES, build_strategy


def deltas(*rows):
    return [({"w": torch.tensor(r, dtype=torch.float32)}, weight) for r, weight in rows]


def fresh():
    return {"w": torch.tensor([1.0, -2.0, 0.5])}


def test_fedavg_applies_the_weighted_average():
    weights = fresh()
    build_strategy("fedavg").aggregate(weights, deltas(([1.0, 0, 0], 1.0), ([0, 4.0, 0], 3.0)))
    assert torch.allclose(weights["w"], torch.tensor([1.25, 1.0, 0.5]))


@pytest.mark.parametrize("nesterov", [True, False])
def test_outer_momentum_equals_torch_sgd_on_the_outer_gradient(nesterov):
    rounds = [deltas(([0.1, -0.2, 0.3], 1.0)), deltas(([0.2, 0.1, -0.1], 1.0)),
              deltas(([-0.3, 0.2, 0.0], 1.0))]
    ours = fresh()
    strategy = build_strategy("momentum", nesterov=nesterov)
    reference = torch.nn.Parameter(fresh()["w"])
    sgd = torch.optim.SGD([reference], lr=0.7, momentum=0.9, nesterov=nesterov)
    for updates in rounds:
        strategy.aggregate(ours, updates)
        reference.grad = -updates[0][0]["w"]  # DiLoCo's outer gradient: θ_global − θ_local
        sgd.step()
    assert torch.allclose(ours["w"], reference.detach(), atol=1e-6)


def test_fedadam_follows_its_update_rule():
    ours = fresh()
    strategy = build_strategy("fedadam", lr=0.01, betas=(0.9, 0.99), eps=1e-3)
    first, second = torch.tensor([0.1, -0.2, 0.3]), torch.tensor([0.3, 0.0, -0.1])
    for delta in (first, second):
        strategy.aggregate(ours, deltas((delta.tolist(), 1.0)))
    m1, v1 = 0.1 * first, 0.01 * first**2
    expected = fresh()["w"] + 0.01 * m1 / (v1.sqrt() + 1e-3)
    m2, v2 = 0.9 * m1 + 0.1 * second, 0.99 * v1 + 0.01 * second**2
    expected += 0.01 * m2 / (v2.sqrt() + 1e-3)
    assert torch.allclose(ours["w"], expected, atol=1e-6)


def test_robust_merges_ignore_outliers_and_weights():
    updates = deltas(([1.0, 5.0], 1.0), ([2.0, 6.0], 1.0), ([1000.0, -900.0], 50.0))
    assert torch.equal(trimmed_mean(updates, trim_fraction=0.34)["w"], torch.tensor([2.0, 5.0]))
    even = deltas(([1.0], 1.0), ([2.0], 1.0), ([3.0], 1.0), ([400.0], 9.0))
    assert torch.equal(median(even)["w"], torch.tensor([2.5]))
    # Too small a fraction to cut one of three: the plain (unweighted) mean.
    assert torch.allclose(trimmed_mean(updates, trim_fraction=0.2)["w"],
                          torch.tensor([1003.0 / 3, -889.0 / 3]))


@pytest.mark.parametrize("name", STRATEGIES)
def test_outer_state_round_trips_and_empty_round_keeps_the_global(name):
    rounds = [deltas(([0.1, -0.2, 0.3], 1.0), ([0.3, 0.2, 0.1], 2.0)),
              deltas(([0.2, 0.1, -0.1], 1.0), ([0.0, 0.1, 0.1], 1.0))]
    straight, weights = build_strategy(name), fresh()
    for updates in rounds:
        straight.aggregate(weights, updates)
    resumed, other = build_strategy(name), fresh()
    resumed.aggregate(other, rounds[0])
    again = build_strategy(name)
    again.load_state_dict(resumed.state_dict())  # as a resume loads it from the version
    again.aggregate(other, rounds[1])
    assert torch.equal(other["w"], weights["w"])
    before = weights["w"].clone()
    straight.aggregate(weights, [])
    assert torch.equal(weights["w"], before)


@pytest.mark.parametrize("name", ["fedavg", "momentum", "fedadam", "trimmed_mean", "median"])
def test_a_scale_takes_the_outer_step_with_the_combined_delta_scaled(name):
    """merge.mode async passes the buffer's staleness discount as `scale`: the same step
    as with a delta that much smaller."""
    updates = deltas(([0.4, -0.2, 0.1], 1.0), ([0.2, 0.6, -0.3], 3.0), ([0.0, 0.2, 0.1], 2.0))
    scaled, reference = fresh(), fresh()
    build_strategy(name).aggregate(scaled, updates, scale=0.25)
    combined = build_strategy(name).combine(updates, out={"w": torch.zeros(3)})
    build_strategy(name).aggregate(reference, [({"w": combined["w"] * 0.25}, 1.0)])
    assert torch.allclose(scaled["w"], reference["w"], atol=1e-7)
    assert not torch.allclose(scaled["w"], fresh()["w"])
