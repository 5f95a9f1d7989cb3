"""Held-out perplexity per eval set, computed after every merge."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from trainer.config import EvalSetConfig
from workers.increments import increment_files, read_texts
from workers.model import mean_nll
from workers.packing import pack, to_arrays, tokenize


@dataclass(frozen=True)
class EvalSet:
    name: str
    ids: np.ndarray  # [N, L]
    lengths: np.ndarray  # [N]

    @property
    def tokens(self) -> int:
        return int(self.lengths.sum())


def load_eval_set(config: EvalSetConfig, *, tokenizer, seq_len: int) -> EvalSet:
    """Every file of the set, packed, cut to the first `max_tokens` tokens."""
    texts = []
    for path in increment_files(config.path):
        texts.extend(t for t in read_texts(path, text_column=config.text_column) if t.strip())
    if not texts:
        raise ValueError(f"eval set {config.name!r}: {config.path} holds no text")
    table = pack(tokenize(tokenizer, texts), seq_len=seq_len,
                 eos_id=tokenizer.eos_token_id, pad_id=tokenizer.pad_token_id)
    ids, lengths = to_arrays(table)
    keep = max(1, -(-config.max_tokens // seq_len))
    ids, lengths = ids[:keep], lengths[:keep].copy()
    overflow = int(lengths.sum()) - config.max_tokens
    if overflow > 0 and lengths[-1] > overflow:
        lengths[-1] -= overflow
    return EvalSet(name=config.name, ids=ids, lengths=lengths)


def perplexity(model: torch.nn.Module, data: EvalSet, *, batch_size: int = 8) -> float:
    """exp(mean next-token NLL) over all real tokens of the set."""
    return math.exp(mean_nll(model, data.ids, data.lengths, batch_size=batch_size))
