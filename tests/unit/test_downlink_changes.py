"""Downlink compression: workers and coordinator hold bit-identical global weights, a worker
that is behind gets the changes it missed, one that holds nothing usable gets a full copy,
and error feedback keeps the held weights on the true global model's track."""

import numpy as np
import pytest
import torch

from trainer.downlink import DownlinkSender
from workers.compression import payload_bytes
from workers.downlink import Changes, FullCopy, HeldWeights, weights_digest


def global_model(seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {"embed": torch.randn(300, 64, generator=generator),
            "norm": torch.ones(64), "odd": torch.randn(7, 13, generator=generator)}


def outer_step(weights: dict[str, torch.Tensor], *, seed: int) -> None:
    """A stand-in for the merger's step: some change of every tensor, in place."""
    generator = torch.Generator().manual_seed(1000 + seed)
    for tensor in weights.values():
        tensor.add_(torch.randn(tensor.shape, generator=generator) * 1e-2)


def digest(weights: dict[str, torch.Tensor]) -> str:
    return weights_digest({k: v.numpy() for k, v in weights.items()})


@pytest.mark.parametrize("kind", ["bf16", "int8"])
def test_workers_hold_the_coordinators_weights_bit_for_bit(kind):
    weights = global_model()
    sender = DownlinkSender(kind=kind, weights=weights, keep=4)
    workers = {"a": HeldWeights(), "b": HeldWeights()}
    for step in range(6):
        for site, held in workers.items():
            if site == "b" and step in (4, 5):  # b sits the last two versions out
                continue
            held.receive(sender.message(site))
            sender.sites[site] = sender.mark
            assert weights_digest(held.weights) == digest(weights)
        outer_step(weights, seed=step)
        sender.settle()
    received = {s: h.receive(sender.message(s)) for s, h in workers.items()}
    assert all(weights_digest(h.weights) == digest(weights) for h in workers.values())
    fp32 = sum(t.numel() * 4 for t in weights.values())
    # a caught up with one change, b with the three it missed: a quarter or half of fp32 each
    limit = {"bf16": 0.5, "int8": 0.27}[kind]  # int8: one fp32 scale per 256 codes
    assert received["a"][1] <= limit * fp32
    assert limit * fp32 * 2 < received["b"][1] <= limit * fp32 * 3


def test_error_feedback_keeps_the_held_weights_on_the_true_track():
    weights = global_model()
    true = {k: v.clone() for k, v in weights.items()}
    sender = DownlinkSender(kind="int8", weights=weights, keep=2)
    for step in range(20):
        outer_step(true, seed=step)  # the model without downlink rounding
        outer_step(weights, seed=step)  # the same step, from the weights the workers hold
        sender.settle()
        for name in weights:
            # What was sent plus what is still owed is the true model (up to float rounding),
            # so no part of any step is lost, only delayed.
            owed = torch.from_numpy(sender.residual[name])
            torch.testing.assert_close(weights[name] + owed, true[name], atol=2e-6, rtol=0)
    sent_error = max(float((weights[k] - true[k]).abs().max()) for k in weights)
    assert 0 < sent_error < 1e-3  # rounded, but never further off than one change's rounding


def test_a_worker_too_far_behind_or_unknown_gets_a_full_copy():
    weights = global_model()
    sender = DownlinkSender(kind="int8", weights=weights, keep=2)
    held = HeldWeights()
    assert isinstance(sender.message("a"), FullCopy)  # holds nothing yet
    first = sender.message("a")
    assert payload_bytes(first.weights) == sum(t.numel() * 4 for t in weights.values())
    held.receive(first)
    sender.sites["a"] = sender.mark
    for step in range(3):  # three changes, two kept
        outer_step(weights, seed=step)
        sender.settle()
    assert isinstance(sender.message("a"), FullCopy)
    held.receive(sender.message("a"))
    assert weights_digest(held.weights) == digest(weights)


def test_a_change_that_does_not_fit_what_a_worker_holds_is_refused():
    weights = global_model()
    sender = DownlinkSender(kind="int8", weights=weights, keep=4)
    sender.sites["a"] = sender.mark
    outer_step(weights, seed=0)
    sender.settle()
    change = sender.message("a")
    assert isinstance(change, Changes) and len(change.changes) == 1
    with pytest.raises(RuntimeError, match="full copy next time"):
        HeldWeights().receive(change)  # a fresh worker holds nothing to add it to


def test_rewind_forgets_the_rejected_change():
    weights = global_model()
    sender = DownlinkSender(kind="int8", weights=weights, keep=4)
    before = {k: v.clone() for k, v in weights.items()}
    mark = sender.mark
    outer_step(weights, seed=0)
    sender.settle()
    sender.sites["got_it"] = sender.mark  # received the candidate before it was rejected
    for name, tensor in weights.items():  # the merger puts the previous global back
        tensor.copy_(before[name])
    sender.rewind(mark)
    assert sender.mark == mark and not sender.chain
    assert isinstance(sender.message("got_it"), FullCopy)
    assert all(np.array_equal(sender.held[k], before[k].numpy()) for k in before)
