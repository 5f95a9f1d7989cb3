"""`tributary export RUN_DIR --merged OUT`: a version as one plain Hugging Face model folder
(safetensors, sharded over run.max_shard_size, + tokenizer), the LoRA adapter folded into the
base weights when the run federated adapters, so `AutoModelForCausalLM.from_pretrained(OUT)`
needs neither PEFT nor Tributary."""

from __future__ import annotations

from pathlib import Path

from trainer import checkpoint
from trainer.config import load_config
from trainer.model_source import load_tokenizer, run_model


def export_merged(run_dir: Path, out: Path, *, version: str | None = None) -> Path:
    """Write the version (default: `latest`) to `out`; returns `out`."""
    config = load_config(run_dir / "config.yaml", check_files=False)
    folder = (run_dir / checkpoint.VERSIONS / version if version
              else checkpoint.latest_version(run_dir))
    if folder is None or not folder.is_dir():
        raise FileNotFoundError(f"{run_dir}: no version {version or 'latest'} to export")
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"{out} exists and is not empty; choose a new folder")
    tokenizer = load_tokenizer(config.model.tokenizer_source())
    model = run_model(config.model, tokenizer=tokenizer, seed=config.run.seed,
                      version_dir=folder)
    if config.model.lora is not None:
        model = model.merge_and_unload()  # W + s·B·A, the adapter layers gone
    model.save_pretrained(out, max_shard_size=config.run.max_shard_size)
    tokenizer.save_pretrained(out)
    return out
