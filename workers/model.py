"""Build a Hugging Face causal LM from its config dict (the weights come from the coordinator),
and measure its loss on packed sequences (held-out perplexity, early stopping)."""

from __future__ import annotations

import numpy as np
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from workers.packing import batch_tensors


def build_model(model_config: dict, *, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """The model's skeleton in `dtype` (its weights are loaded every round): in bf16 it
    never takes fp32's memory on the site, only DeepSpeed's fp32 masters do."""
    config = dict(model_config)
    config = AutoConfig.for_model(config.pop("model_type"), **config)
    return AutoModelForCausalLM.from_config(config, dtype=dtype)


@torch.no_grad()
def mean_nll(model: torch.nn.Module, ids: np.ndarray, lengths: np.ndarray, *,
             batch_size: int, device: torch.device | str = "cpu") -> float:
    """Mean next-token negative log-likelihood over all real (non-pad) tokens of the sequences.
    Leaves the model in eval mode."""
    model.eval()
    total_nll, total_tokens = 0.0, 0
    for start in range(0, len(ids), batch_size):
        batch = {k: v.to(device) for k, v in batch_tensors(
            ids[start:start + batch_size], lengths[start:start + batch_size]).items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        targets = batch["labels"][:, 1:]
        nll = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]).float(), targets.reshape(-1),
            ignore_index=-100, reduction="sum")
        total_nll += float(nll)
        total_tokens += int((targets != -100).sum())
    return total_nll / max(total_tokens, 1)
