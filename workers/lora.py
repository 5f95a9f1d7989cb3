"""LoRA federation with a shared frozen A (as FFA-LoRA, Sun et al. 2024).

Every adapted weight becomes W + s·B·A. A is drawn once from the run's seed and frozen, the
same on the coordinator and every worker (it travels with the adapter, so nobody relies on
two RNGs agreeing); only B trains. A worker's full-weight update is then s·(B_i − B)·A, and
the weighted average of those is s·(avg B_i − B)·A: averaging the B deltas is exactly averaging
the workers' weight updates, which averaging A and B separately would not be. Only B deltas
travel to the coordinator; the adapter (A and B) travels back; the base weights travel once.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class LoraSpec:
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])


def apply_lora(model: torch.nn.Module, spec: LoraSpec, *, seed: int) -> torch.nn.Module:
    """The model wrapped with PEFT LoRA adapters, A drawn from `seed` and frozen."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=spec.r, lora_alpha=spec.alpha, lora_dropout=spec.dropout,
                        target_modules=list(spec.target_modules), bias="none",
                        task_type="CAUSAL_LM")
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        wrapped = get_peft_model(model, config)
    for name, param in wrapped.named_parameters():
        param.requires_grad = is_trained(name)
    return wrapped


def is_adapter(name: str) -> bool:
    return ".lora_A." in name or ".lora_B." in name


def is_trained(name: str) -> bool:
    """Only B trains (and is merged); A stays as drawn."""
    return ".lora_B." in name
