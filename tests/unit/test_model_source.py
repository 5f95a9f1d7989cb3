"""Every model folder is read as safetensors: the cached SmolLM2 folder too, so a pickled
checkpoint planted there (or left by an old version) is refused, never unpickled. A folder
brings its own tokenizer, and one that does not fit its embeddings is refused."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from trainer.config import ConfigError, ModelConfig
from trainer.model_source import load_start_model, load_tokenizer


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


def tiny_folder(folder, *, vocab: int) -> None:
    config = LlamaConfig(vocab_size=vocab, hidden_size=16, intermediate_size=32,
                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)


def test_a_model_folder_trains_with_its_own_tokenizer(tmp_path):
    """GPT-2's tokenizer shipped in the folder (its embeddings padded to a multiple of 64, as
    models often are): found without naming it, and accepted."""
    folder = tmp_path / "model"
    tiny_folder(folder, vocab=50304)
    load_tokenizer("gpt2").save_pretrained(folder)
    model = ModelConfig(source=str(folder))
    tokenizer = load_tokenizer(model.tokenizer_source())
    assert len(tokenizer) == 50257 and tokenizer.encode(" Tributary") == [309, 2455, 560]
    loaded = load_start_model(model, tokenizer=tokenizer, seed=0)
    assert loaded.get_input_embeddings().num_embeddings == 50304
    assert next(loaded.parameters()).dtype == torch.float32


def test_a_tokenizer_larger_than_the_embeddings_is_refused_naming_both(tmp_path):
    folder = tmp_path / "model"
    tiny_folder(folder, vocab=1000)
    model = ModelConfig(source=str(folder), tokenizer="gpt2")
    with pytest.raises(ConfigError, match=rf"model.tokenizer: gpt2 has 50257 tokens, but "
                                          rf"model.source {folder} embeds only 1000"):
        load_start_model(model, tokenizer=load_tokenizer("gpt2"), seed=0)
