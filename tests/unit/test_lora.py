"""LoRA with a shared frozen A, on real Workers (DeepSpeed on CPU, no Ray): only B travels,
and merging the B deltas is exactly averaging the workers' full-weight updates."""

from __future__ import annotations

import copy

import numpy as np
import torch

from trainer.config import ModelConfig
from trainer.merge import weighted_average
from trainer.model_source import load_start_model, load_tokenizer
from workers.lora import LoraSpec, apply_lora, is_adapter, is_trained
from workers.replay import ReplayConfig
from workers.types import Cursor, SiteConfig, TrainSpec, WorkerConfig
from workers.worker import Worker

ARCH = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 2, "num_key_value_heads": 1, "max_position_embeddings": 128}
SPEC = LoraSpec(r=4, alpha=8.0, target_modules=["q_proj", "v_proj"])


def merged_weights(model, adapter: dict) -> dict[str, torch.Tensor]:
    """The full weights W + s·B·A of `model` with `adapter` loaded (PEFT's own merge)."""
    model = copy.deepcopy(model)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name in adapter:
                param.copy_(torch.as_tensor(adapter[name]))
    return {k: v.clone() for k, v in model.merge_and_unload().state_dict().items()}


def test_b_deltas_merge_to_the_average_of_full_weight_updates(demo_root, tmp_path):
    tokenizer = load_tokenizer("gpt2")
    base = load_start_model(ModelConfig(source="random", tokenizer="gpt2", architecture=ARCH),
                            tokenizer=tokenizer, seed=0)
    model_config = base.config.to_dict()
    glob = apply_lora(base, SPEC, seed=0)
    adapter = {n: p.detach().numpy().copy() for n, p in glob.named_parameters() if is_adapter(n)}
    frozen = {n: p.detach().numpy().copy() for n, p in glob.named_parameters()
              if not is_adapter(n)}
    train = TrainSpec(worker=WorkerConfig(local_steps=2, batch_size=2, seq_len=32, lr=1e-2),
                      replay=ReplayConfig(ratio=0.0), seed=0, lora=SPEC,
                      deepspeed={"zero_optimization": {"stage": 0}})
    updates = []
    for site, column in (("code", "source"), ("speeches", "text")):
        worker = Worker(site=SiteConfig(site, str(demo_root / "data" / "demo" / site), column),
                        model_config=model_config, tokenizer=tokenizer, train=train,
                        state_dir=str(tmp_path / site))
        updates.append(worker.train_round(worker.plan(round_index=1, cursor=Cursor()),
                                          adapter, frozen))

    b_names = sorted(n for n in adapter if is_trained(n))
    for update in updates:  # only B travels, and it is all that moved
        assert sorted(update.delta) == b_names
        assert update.metrics["bytes_sent"] == sum(adapter[n].nbytes for n in b_names)
        assert max(np.abs(d).max() for d in update.delta.values()) > 0

    weights = [u.weight for u in updates]
    average = weighted_average([({k: torch.from_numpy(v) for k, v in u.delta.items()}, w)
                                for u, w in zip(updates, weights, strict=True)])
    merged = {n: adapter[n] + average[n].numpy() if n in average else adapter[n]
              for n in adapter}
    start = merged_weights(glob, adapter)
    result = merged_weights(glob, merged)
    per_worker = [merged_weights(glob, {**adapter, **{n: adapter[n] + u.delta[n]
                                                       for n in u.delta}}) for u in updates]
    total = sum(weights)
    for key in start:
        expected = sum(w * (full[key] - start[key]) for full, w in
                       zip(per_worker, weights, strict=True)) / total
        assert torch.allclose(result[key] - start[key], expected, atol=1e-7), key
    changed = [k for k in start if not torch.equal(result[k], start[k])]
    assert changed and all(("q_proj" in k or "v_proj" in k) for k in changed)
