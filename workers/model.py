"""Build a Hugging Face causal LM from its config dict (the weights come from the coordinator)."""

from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForCausalLM


def build_model(model_config: dict) -> torch.nn.Module:
    config = dict(model_config)
    config = AutoConfig.for_model(config.pop("model_type"), **config)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return model
