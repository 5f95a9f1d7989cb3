"""Helpers shared by the integration and chaos suites."""

from __future__ import annotations

import itertools
import socket
from pathlib import Path

from trainer.checkpoint import all_manifests
from trainer.config import Config, config_from_dict, resolve_paths
from workers.increments import read_texts

ARCH = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64,
        "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1,
        "max_position_embeddings": 128}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def tiny_config(demo_root: Path, notes: Path, run_dir: Path, **overrides) -> Config:
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
                  "text_column": "source", "max_tokens": 256, "newest": True}],
        # Re-warming, a proximal term and an aged, site-balanced replay are on in every
        # integration and chaos run, so the resume tests prove their state is carried too.
        "worker": {"local_steps": 3, "batch_size": 4, "seq_len": 64, "lr": 1e-3,
                   "num_cpus": 1, "prox_mu": 0.01,
                   "lr_schedule": {"kind": "rewarm", "warmup_steps": 2, "decay_steps": 2},
                   "deepspeed": str(demo_root / "configs" / "deepspeed" / "cpu.json")},
        "replay": {"ratio": 0.25, "capacity_tokens": 32768, "balance": "sites",
                   "age_weight": 1.0},
        "merge": {"min_workers": 1, "round_timeout_s": 600},
    }
    sets = [f"{key}={value}" for key, value in overrides.items()]
    return resolve_paths(config_from_dict(raw, overrides=sets))


def assert_rows_exactly_once(run_dir: Path, site: str, *, text_column: str) -> list[dict]:
    """Across all manifests, the site's ranges tile each file from row 0 with no gap or
    overlap; files before the cursor are complete. Returns the ranges."""
    manifests = all_manifests(run_dir, include_rejected=True)  # rejected ones consumed rows too
    ranges = [r for m in manifests for r in m["increments"].get(site, [])]
    assert ranges, f"{site} trained nothing"
    by_file: dict[str, list] = {}
    for r in ranges:
        by_file.setdefault(r["file"], []).append((r["start_row"], r["end_row"]))
    cursor = manifests[-1]["cursors"][site]
    for file, spans in by_file.items():
        spans.sort()
        assert spans[0][0] == 0, f"{file}: rows before {spans[0][0]} never trained"
        for (_, end), (start, _) in itertools.pairwise(spans):
            assert end == start, f"{file}: rows {end}..{start} skipped or trained twice"
        if Path(file).name != cursor["file"]:
            rows = len(read_texts(file, text_column=text_column))
            assert spans[-1][1] == rows, f"{file}: finished file not fully trained"
        else:
            assert spans[-1][1] == cursor["row"]
    return ranges
