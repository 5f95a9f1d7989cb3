"""Every model folder is read as safetensors: the cached SmolLM2 folder too, so a pickled
checkpoint planted there (or left by an old version) is refused, never unpickled."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from trainer.config import ModelConfig
from trainer.model_source import load_start_model


def test_cached_smollm2_folder_with_pickled_weights_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("TRIBUTARY_CACHE", str(tmp_path))
    folder = tmp_path / "smollm2-135m-instruct"
    config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32,
                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1)
    model = AutoModelForCausalLM.from_config(config)
    model.config.save_pretrained(folder)
    torch.save(model.state_dict(), folder / "pytorch_model.bin")  # a pickle, no safetensors
    with pytest.raises(OSError, match="safetensors"):
        load_start_model(ModelConfig(source="smollm2"), tokenizer=None, seed=0)
