"""bf16 sites keep exact fp32 deltas: each rank's fp32 master weights start from the global
fp32 weights exactly, and the delta is fp32 master − global, so an update far below bf16's
resolution reaches the merged global model round after round instead of being rounded away."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import tiny_config, zero_config
from trainer.coordinator import run_training

pytestmark = pytest.mark.integration
LR = 1e-7  # AdamW moves a weight by at most about lr a step; bf16's spacing near 0.02 is 1.2e-4


def bf16(stage: int, *, asked_by: str) -> dict[str, str]:
    """The overrides for bf16 at ZeRO `stage`, asked for in the DeepSpeed JSON or by
    model.dtype."""
    ds = zero_config(stage)
    if asked_by == "deepspeed":
        return {"worker.deepspeed": json.dumps({**ds, "bf16": {"enabled": True}})}
    return {"worker.deepspeed": json.dumps(ds), "model.dtype": "bf16"}


@pytest.mark.parametrize(("stage", "ranks", "asked_by"),
                         [(0, 1, "deepspeed"), (2, 2, "deepspeed"), (3, 2, "model.dtype")])
def test_updates_below_bf16_resolution_survive_into_the_global_model(
        stage, ranks, asked_by, ray_cluster, demo_root, notes_site, tmp_path):
    run_dir = tmp_path / f"bf16-zero{stage}"
    config = tiny_config(demo_root, notes_site, run_dir, **bf16(stage, asked_by=asked_by), **{
        "worker.lr": f"{LR:.1e}", "worker.prox_mu": 0,
        "sites.speeches.num_workers": ranks, "worker.num_cpus": 0.5, "rounds": 3})
    assert config.train_spec("speeches").deepspeed["bf16"]["enabled"]
    run_training(config)

    start = load_file(str(run_dir / "versions" / "v0000" / "model.safetensors"))
    end = load_file(str(run_dir / "versions" / "v0003" / "model.safetensors"))
    steps = 3 * 3 * 2  # rounds × local steps, with room for the re-warm schedule's shape
    moved = total = 0
    for name, before in start.items():
        change = (end[name] - before).abs()
        # Rounding through bf16 (the old path) moves weights by up to half bf16's spacing.
        assert float(change.max()) <= steps * LR, f"{name} moved by {float(change.max()):.3g}"
        if "embed_tokens" not in name and "lm_head" not in name:  # rows of unseen tokens rest
            moved += int((change > 0).sum())
            total += change.numel()
    assert moved > 0.5 * total, f"only {moved} of {total} weights moved"
    # Those updates are below bf16's resolution: in bf16 the global would not have moved.
    same = sum(int((end[n].bfloat16() == start[n].bfloat16()).sum()) for n in start)
    assert same > 0.9 * sum(t.numel() for t in start.values())
    assert all(end[n].dtype == torch.float32 for n in end)
