"""Integration fixtures: one real local Ray cluster per session (dashboard and metrics on
127.0.0.1, token auth on), and a small tiny-model config over real demo text."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
import ray

from cluster.connect import NAMESPACE
from trainer.config import config_from_dict, resolve_paths

ARCH = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64,
        "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1,
        "max_position_embeddings": 128}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def ray_cluster():
    metrics_port = free_port()
    ray.init(namespace=NAMESPACE, num_cpus=2, include_dashboard=True,
             dashboard_host="127.0.0.1", dashboard_port=free_port(),
             _metrics_export_port=metrics_port)
    yield {"metrics_port": metrics_port}
    ray.shutdown()


@pytest.fixture(scope="session")
def notes_site(demo_root) -> Path:
    """A JSONL site whose text column is called `body`: real speech paragraphs, 3 files."""
    import pyarrow.parquet as pq

    rows = pq.read_table(demo_root / "data" / "demo" / "speeches" / "1800s.parquet")
    texts = [t for t in rows.column("text").to_pylist() if 200 < len(t) < 900][:24]
    folder = demo_root / "notes"
    folder.mkdir()
    for index in range(3):
        with open(folder / f"part-{index}.jsonl", "w") as handle:
            for text in texts[index * 8:(index + 1) * 8]:
                handle.write(json.dumps({"body": text, "id": index}) + "\n")
    return folder


def tiny_config(demo_root: Path, notes: Path, run_dir: Path, **overrides):
    data = demo_root / "data" / "demo"
    raw = {
        "run": {"dir": str(run_dir), "seed": 0},
        "rounds": 2,
        "model": {"source": "random", "tokenizer": "gpt2", "architecture": ARCH},
        "sites": [{"name": "speeches", "path": str(data / "speeches")},
                  {"name": "notes", "path": str(notes), "text_column": "body"}],
        "eval": [{"name": "shakespeare", "path": str(data / "eval" / "shakespeare.txt"),
                  "max_tokens": 256},
                 {"name": "code", "path": str(data / "eval" / "code.jsonl"),
                  "text_column": "source", "max_tokens": 256}],
        "worker": {"local_steps": 3, "batch_size": 4, "seq_len": 64, "lr": 1e-3,
                   "num_cpus": 1, "deepspeed": str(demo_root / "configs" / "deepspeed" / "cpu.json")},
        "replay": {"ratio": 0.25, "capacity_tokens": 32768},
        "merge": {"min_workers": 1, "round_timeout_s": 600},
    }
    return resolve_paths(config_from_dict(raw, overrides=[f"{k}={v}" for k, v in overrides.items()]))
