"""A LoRA run end to end: 2 workers × 2 rounds federating adapters only; versions hold the
adapter in PEFT format; `tributary export --merged` gives a model plain transformers loads."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.helpers import tiny_config
from trainer.checkpoint import all_manifests
from trainer.cli import main as cli
from trainer.config import load_config
from trainer.coordinator import run_training
from trainer.metrics import read_metrics
from trainer.model_source import load_start_model, load_tokenizer

pytestmark = pytest.mark.integration
LORA = {"model.lora": "{r: 4, alpha: 8, target_modules: [q_proj, v_proj]}"}


def test_lora_run_sends_adapters_and_exports_a_plain_model(ray_cluster, demo_root, notes_site,
                                                           tmp_path):
    run_dir = tmp_path / "lora"
    run_training(tiny_config(demo_root, notes_site, run_dir, **LORA))
    latest = run_dir / "versions" / "latest"
    adapter = load_file(str(latest / "adapter_model.safetensors"))
    assert json.loads((latest / "adapter_config.json").read_text())["r"] == 4
    assert not (latest / "model.safetensors").exists()  # versions hold the adapter only
    adapter_bytes = sum(t.numel() * 4 for t in adapter.values())  # A and B, fp32
    b_bytes = sum(t.numel() * 4 for k, t in adapter.items() if "lora_B" in k)
    records = read_metrics(run_dir)
    assert [r["workers_ok"] for r in records] == [0, 2, 2]
    for record in records[1:]:
        assert set(record["bytes_sent"].values()) == {b_bytes}  # only B travels back
    # Round 2 brings only the adapter; round 1 brought the frozen base once as well.
    assert set(records[2]["bytes_received"].values()) == {adapter_bytes}
    assert all(v > 100 * adapter_bytes for v in records[1]["bytes_received"].values())
    assert all(m["eval"] for m in all_manifests(run_dir))

    out = tmp_path / "merged"
    assert cli(["export", str(run_dir), "--merged", str(out)]) == 0
    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert not any("lora" in name for name, _ in model.named_parameters())
    ids = tokenizer("The state of the union", return_tensors="pt")["input_ids"]
    assert model.generate(ids, max_new_tokens=4, do_sample=False).shape[1] == ids.shape[1] + 4
    # The export is the run's start model with the latest adapter folded in: each adapted
    # weight is W + (alpha/r)·B·A from the version's own A and B, every other weight is W.
    assert_export_is_base_plus_adapter(model, run_dir, adapter)

    run_training(tiny_config(demo_root, notes_site, run_dir, rounds=3, **LORA), resume=True)
    assert [m["round"] for m in all_manifests(run_dir)] == [0, 1, 2, 3]


def assert_export_is_base_plus_adapter(merged, run_dir, adapter: dict) -> None:
    """Fold the adapter in by hand, from the saved A and B, onto the start model the run's
    config and seed give (model.source random), and compare with the exported model."""
    config = load_config(run_dir / "config.yaml")
    lora = config.model.lora
    base = load_start_model(config.model, tokenizer=load_tokenizer(config.model.tokenizer),
                            seed=config.run.seed).state_dict()
    exported = merged.state_dict()
    assert exported.keys() == base.keys()
    adapted = {}
    for key, a in adapter.items():  # base_model.model.<name>.lora_A.weight, as PEFT saves
        if ".lora_A." in key:
            name = key.removeprefix("base_model.model.").replace(".lora_A.weight", ".weight")
            b = adapter[key.replace(".lora_A.", ".lora_B.")]
            adapted[name] = base[name] + (lora.alpha / lora.r) * (b.double() @ a.double()).float()
    assert len(adapted) == 2 * config.model.architecture["num_hidden_layers"]  # q and v
    for name, tensor in base.items():
        expected = adapted.get(name, tensor)
        torch.testing.assert_close(exported[name], expected, rtol=1e-5, atol=1e-6,
                                   msg=lambda text, name=name: f"{name}: {text}")
    unmoved = [name for name in adapted if torch.equal(exported[name], base[name])]
    assert not unmoved, f"the adapter left these weights at the base: {unmoved}"
