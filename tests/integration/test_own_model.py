"""Your own Hugging Face model folder: it trains with the tokenizer it ships (GPT-2's here, not
SmolLM2's) without naming it, and versions over run.max_shard_size are written as sharded
safetensors with an index that plain transformers loads, as is `tributary export`."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

from tests.helpers import ARCH, tiny_config
from trainer.checkpoint import all_manifests
from trainer.coordinator import run_training
from trainer.export import export_merged
from trainer.model_source import load_tokenizer

pytestmark = pytest.mark.integration


def shards(folder) -> dict[str, torch.Tensor]:
    """Every tensor of a sharded safetensors folder, read without transformers."""
    out = {}
    for path in sorted(folder.glob("model-*.safetensors")):
        out.update(load_file(str(path)))
    return out


def test_a_model_folder_with_its_own_tokenizer_trains_and_is_published_sharded(
        ray_cluster, demo_root, notes_site, tmp_path):
    folder = tmp_path / "my-model"
    arch = {k: v for k, v in ARCH.items() if k != "model_type"}
    model = AutoModelForCausalLM.from_config(LlamaConfig(vocab_size=50304, **arch))
    model.save_pretrained(folder)  # ~13 MB of fp32 weights: 4 shards of at most 4 MB
    load_tokenizer("gpt2").save_pretrained(folder)
    run_dir = tmp_path / "run"
    config = tiny_config(demo_root, notes_site, run_dir, **{
        "model.source": str(folder), "model.tokenizer": "null", "model.architecture": "{}",
        "run.max_shard_size": "4MB"})
    assert config.model.tokenizer is None
    run_training(config)

    assert all_manifests(run_dir)[-1]["round"] == 2
    version = run_dir / "versions" / "v0002"
    assert (version / "model.safetensors.index.json").is_file()
    assert len(list(version.glob("model-*.safetensors"))) >= 3
    loaded = AutoModelForCausalLM.from_pretrained(version)  # plain transformers
    written = shards(version)
    assert set(written) == set(loaded.state_dict())
    assert all(torch.equal(loaded.state_dict()[n], t) for n, t in written.items())
    start = shards(run_dir / "versions" / "v0000")
    assert not torch.equal(start["model.layers.0.mlp.up_proj.weight"],
                           written["model.layers.0.mlp.up_proj.weight"]), "nothing trained"
    assert len(AutoTokenizer.from_pretrained(version)) == 50257  # the folder's own: GPT-2's

    out = export_merged(run_dir, tmp_path / "export")
    assert (out / "model.safetensors.index.json").is_file()
    exported = AutoModelForCausalLM.from_pretrained(out).state_dict()
    assert all(torch.equal(exported[n], t) for n, t in written.items())
