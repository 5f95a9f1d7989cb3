"""The Worker on a CUDA device with a bf16 DeepSpeed engine. Skipped where no GPU exists;
its CPU twin is tests/unit/test_worker.py."""

import numpy as np
import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def test_bf16_round_on_gpu_gives_finite_fp32_delta(demo_root, tmp_path):
    from trainer.config import ModelConfig
    from trainer.model_source import load_start_model, load_tokenizer
    from workers.replay import ReplayConfig
    from workers.types import Cursor, SiteConfig, TrainSpec, WorkerConfig
    from workers.worker import Worker

    tokenizer = load_tokenizer("gpt2")
    arch = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 128}
    model = load_start_model(ModelConfig(source="random", tokenizer="gpt2", architecture=arch),
                             tokenizer=tokenizer, seed=0)
    weights = {n: p.detach().numpy().copy() for n, p in model.named_parameters()}
    train = TrainSpec(worker=WorkerConfig(local_steps=2, batch_size=4, seq_len=64, lr=1e-3),
                      replay=ReplayConfig(ratio=0.0), seed=0,
                      deepspeed={"bf16": {"enabled": True}, "zero_optimization": {"stage": 2}})
    site = SiteConfig("code", str(demo_root / "data" / "demo" / "code"), "source")
    worker = Worker(site=site, model_config=model.config.to_dict(), tokenizer=tokenizer,
                    train=train, state_dir=str(tmp_path))
    update = worker.train_round(worker.plan(round_index=1, cursor=Cursor()), weights)
    assert str(worker.device).startswith("cuda")
    assert all(d.dtype == np.float32 and np.isfinite(d).all() for d in update.delta.values())
