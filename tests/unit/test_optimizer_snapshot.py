"""The optimizer snapshot a commit writes: a copy the optimizer can step on from, taken into
the previous snapshot's memory when it fits."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from workers.engine import load_optimizer_state, optimizer_snapshot, write_optimizer_snapshot
from workers.partitions import EngineWeights


def plain(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> EngineWeights:
    """A ZeRO-0 fp32 engine's layout: the optimizer steps the module's own parameters."""
    return EngineWeights(SimpleNamespace(module=model, optimizer=optimizer), rank=0)


def stepped(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    model(torch.randn(4, 8)).square().mean().backward()
    optimizer.step()
    optimizer.zero_grad()


def test_a_snapshot_reuses_the_last_ones_memory_and_holds_the_state_at_its_time(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    stepped(model, optimizer)
    first, _ = optimizer_snapshot(plain(model, optimizer))
    stepped(model, optimizer)
    second = optimizer_snapshot(plain(model, optimizer), into=first)
    pointers = {k: t.data_ptr() for k, t in first.items()}
    assert {k: t.data_ptr() for k, t in second[0].items()} == pointers
    expected = {k: t.clone() for k, t in second[0].items()}
    stepped(model, optimizer)  # the optimizer steps on; the snapshot does not move
    assert all(torch.equal(second[0][k], expected[k]) for k in expected)
    assert not torch.equal(second[0]["0.exp_avg"], optimizer.state[model.weight]["exp_avg"])

    write_optimizer_snapshot(second, tmp_path)
    load_optimizer_state(plain(model, optimizer), tmp_path)
    assert torch.equal(optimizer.state[model.weight]["exp_avg"], expected["0.exp_avg"])
    assert int(optimizer.state[model.weight]["step"]) == 2


def test_a_snapshot_copies_afresh_where_the_old_memory_does_not_fit():
    model = torch.nn.Linear(8, 3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    stepped(model, optimizer)
    wrong = {"0.exp_avg": torch.zeros(2, 2), "1.exp_avg": torch.zeros(3, dtype=torch.float64)}
    tensors, _ = optimizer_snapshot(plain(model, optimizer), into=wrong)
    assert tensors["0.exp_avg"].shape == (3, 8) and tensors["1.exp_avg"].dtype == torch.float32
    assert tensors["0.exp_avg"].data_ptr() != wrong["0.exp_avg"].data_ptr()
    assert torch.equal(tensors["0.exp_avg"], optimizer.state[model.weight]["exp_avg"])
