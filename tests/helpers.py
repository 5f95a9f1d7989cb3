"""Helpers shared by the integration and chaos suites."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import yaml

from trainer.checkpoint import all_manifests
from trainer.config import Config, config_from_dict, resolve_paths
from workers.increments import increment_files, read_texts
from workers.storage import base_name

REPO_ROOT = Path(__file__).resolve().parents[1]
ARCH = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64,
        "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1,
        "max_position_embeddings": 128}


def free_port() -> int:
    return free_ports(1)[0]


def free_ports(count: int) -> list[int]:
    """`count` distinct free ports: the sockets are held open together while the OS picks, so
    two calls in a row cannot hand out the same port (it happened: the metrics agent and the
    dashboard got one port, and the test cluster did not start)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


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


def zero_config(stage: int, **extra) -> dict:
    """The CPU DeepSpeed config at ZeRO `stage`; every parameter really partitioned at 3
    (by default DeepSpeed keeps parameters under 100k elements whole, i.e. all of these)."""
    config = json.loads((REPO_ROOT / "configs" / "deepspeed" / "cpu.json").read_text())
    config["zero_optimization"] = {"stage": stage, "stage3_param_persistence_threshold": 0}
    return {**config, **extra}


def assert_tiny_rows_exactly_once(run_dir: Path) -> None:
    """Both sites of a `tiny_config` run (speeches and notes): every row exactly once."""
    assert_rows_exactly_once(run_dir, "notes", text_column="body")
    assert_rows_exactly_once(run_dir, "speeches", text_column="text")


def assert_rows_exactly_once(run_dir: Path, site: str, *, text_column: str,
                             location: str | Path | None = None) -> list[dict]:
    """Every row of every increment file of the site (listed from `location`, the site's
    folder, or taken from the config) up to the cursor is in exactly one accepted or
    rejected version's ranges — token by token where a row was split between rounds — and
    nothing past the cursor is. Files recorded as damaged are the only ones left out.
    Returns the ranges."""
    manifests = all_manifests(run_dir, include_rejected=True)  # rejected ones consumed rows too
    ranges = [r for m in manifests for r in m["increments"].get(site, [])]
    assert ranges, f"{site} trained nothing"
    if location is None:
        config = yaml.safe_load((Path(run_dir) / "config.yaml").read_text())
        location = next(s["path"] for s in config["sites"] if s["name"] == site)
    damaged = set(manifests[-1].get("skipped", {}).get(site, []))
    cursor = manifests[-1]["cursors"][site]
    by_name: dict[str, list] = {}
    for r in ranges:
        start = (r["start_row"], r.get("start_token", 0))
        end = (r["end_row"], 0) if "end_token" not in r else (r["end_row"] - 1, r["end_token"])
        by_name.setdefault(base_name(r["file"]), []).append((start, end))
    for file in increment_files(location):
        spans = sorted(by_name.pop(file.name, []))
        if file.name in damaged:
            continue
        if cursor["file"] is None or file.name > cursor["file"]:
            assert not spans, f"{file}: trained past the cursor"
            continue
        rows = len(read_texts(file, text_column=text_column))
        position = (0, 0)
        for start, end in spans:
            assert start == position, f"{file}: rows from {position} to {start} skipped or " \
                                      "trained twice"
            position = end
        done = (cursor["row"], cursor.get("token", 0)) if file.name == cursor["file"] else (rows, 0)
        assert position == done, f"{file}: trained up to {position}, expected {done}"
    assert not by_name, f"ranges of files the site does not hold: {sorted(by_name)}"
    return ranges


class EnvironProbe:
    """Stands in for a Worker: reports the environment its process was started with."""

    def __init__(self, **_: object) -> None:
        pass

    def start_environ(self) -> dict[str, str]:
        # /proc/self/environ is the environment at exec: what glibc read when it started.
        raw = Path("/proc/self/environ").read_bytes().split(b"\0")
        return dict(item.decode().split("=", 1) for item in raw if b"=" in item)

