"""Peak memory of the coordinator and of a worker, measured on real runs of growing random
Llama models, and a linear fit per role and setup that predicts what larger models need.

    python benchmarks/memory.py            # 10 runs, ~9 min on 2 cores, up to ~23 GB of memory
    python benchmarks/memory.py --quick    # the two smallest runs
    python benchmarks/memory.py --zero     # per rank at ZeRO-0/1/2/3 x 1/2/4 ranks (zero_memory.py)
    python benchmarks/memory.py --zero --stages 0,3  # those stages only

Each run: 2 sites on the demo data, 1 round of 2 steps of 2 × 64 tokens, on this machine's
local Ray cluster. While it runs, a sampler reads every 0.2 s the USS (memory only that
process holds) of the coordinator (this process) and of each worker actor (processes named
`ray::Worker…`), and the node's object-store bytes in use; the table gives each peak.
Setups: full federation (fp32 deltas; bf16 deltas and downlink; sharded merging with 2
reducers) and LoRA (r 16 on the attention projections). The fit is peak = a + b × parameters
per role and setup, least squares over the measured sizes; its predictions for 8B and 70B
are printed beside the measured points, and a ratio line checks that extrapolation: each
setup's largest model against what the fit of its smaller sizes predicts. Workers train in fp32 here (no GPU): on a GPU with
bf16 weights a worker's model and gradients take half as much.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import numpy as np
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/sampling.py
from sampling import Periodic, store_bytes_used, uss, worker_processes

from trainer.config import config_from_dict, resolve_paths
from trainer.coordinator import RunError, run_training
from trainer.demo import prepare_demo
from trainer.table import markdown

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "data" / "demo"
LLAMA = {"model_type": "llama", "max_position_embeddings": 256, "tie_word_embeddings": True}
SIZES = {  # name -> architecture (GPT-2's tokenizer: vocabulary 50 257)
    "38M": {"hidden_size": 384, "intermediate_size": 1024, "num_hidden_layers": 12,
            "num_attention_heads": 6, "num_key_value_heads": 2},
    "135M": {"hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
             "num_attention_heads": 9, "num_key_value_heads": 3},
    "360M": {"hidden_size": 960, "intermediate_size": 2560, "num_hidden_layers": 32,
             "num_attention_heads": 15, "num_key_value_heads": 5},
    "1.1B": {"hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 22,
             "num_attention_heads": 32, "num_key_value_heads": 4},
}
LORA = {"r": 16, "alpha": 32, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]}
SETUPS = {  # name -> config overrides
    "full fp32": {},
    "full bf16 up+down": {"merge": {"compression": "bf16", "downlink": "bf16"}},
    "full sharded (2 reducers)": {"merge": {"reducers": 2}},
    "LoRA r16": {"model": {"lora": LORA}},
}
# Full federation of 360M with the downlink or reducers, and of 1.1B, needs more than this
# machine's 24 GiB for two workers and a coordinator: they are predicted, not run.
RUNS = [(size, setup) for size in ("38M", "135M") for setup in list(SETUPS)[:3]]
RUNS += [("360M", "full fp32"), ("135M", "LoRA r16"), ("360M", "LoRA r16"), ("1.1B", "LoRA r16")]
PREDICT = {"8B": 8.0e9, "70B": 70.0e9}


class Sampler(Periodic):
    """Peaks of the coordinator's and the workers' USS and of the object store, while the
    block runs (every 0.2 s: reading a process's USS walks its memory map)."""

    every_s = 0.2

    def __init__(self) -> None:
        self.coordinator = self.worker = self.store = 0
        self.me = psutil.Process()

    def sample(self) -> None:
        self.coordinator = max(self.coordinator, uss(self.me))
        for process in worker_processes():
            self.worker = max(self.worker, uss(process))
        self.store = max(self.store, store_bytes_used() or 0)  # None: Ray not up


def config(run_dir: Path, *, size: str, setup: str):
    raw = {
        "run": {"dir": str(run_dir), "seed": 0},
        "rounds": 1,
        "model": {"source": "random", "tokenizer": "gpt2",
                  "architecture": {**LLAMA, **SIZES[size]}},
        "sites": [{"name": "speeches", "path": str(DEMO / "speeches")},
                  {"name": "code", "path": str(DEMO / "code"), "text_column": "source"}],
        "eval": [{"name": "code", "path": str(DEMO / "eval" / "code.jsonl"),
                  "text_column": "source", "max_tokens": 128}],
        "worker": {"local_steps": 2, "batch_size": 2, "seq_len": 64, "lr": 1e-4,
                   "num_cpus": 1, "deepspeed": str(REPO / "configs" / "deepspeed" / "cpu.json")},
        "replay": {"ratio": 0.0, "capacity_tokens": 4096},
        "merge": {"min_workers": 2},
        "cluster": {"include_dashboard": False},
    }
    for section, values in SETUPS[setup].items():
        raw[section] = {**raw[section], **values}
    return resolve_paths(config_from_dict(raw))


def parameters(run_dir: Path) -> int:
    from safetensors import safe_open

    folder = run_dir / "versions" / "v0000"
    total = 0
    for file in folder.glob("*.safetensors"):
        with safe_open(str(file), "pt") as handle:
            names = handle.keys()  # a safetensors handle is not iterable
            total += sum(int(np.prod(handle.get_slice(k).get_shape())) for k in names)
    return total


def fit(points: list[tuple[int, int]]) -> tuple[float, float]:
    """(a, b) of bytes = a + b × parameters, least squares (b alone through 0 for one point)."""
    x = np.array([p for p, _ in points], dtype=float)
    y = np.array([m for _, m in points], dtype=float)
    if len(points) == 1:
        return 0.0, float(y[0] / x[0])
    b, a = np.polyfit(x, y, 1)
    return float(a), float(b)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default=str(REPO / "runs" / "bench-memory"))
    parser.add_argument("--zero", action="store_true",
                        help="peak memory per rank of a site at each ZeRO stage instead")
    parser.add_argument("--stages", default="0,1,2,3",
                        help="with --zero: the stages, comma-separated, 0 first")
    args = parser.parse_args()
    prepare_demo(DEMO)
    if args.zero:
        import zero_memory

        zero_memory.run(Path(args.out), quick=args.quick,
                        stages=tuple(int(x) for x in args.stages.split(",")))
        return
    runs = [("38M", "full fp32"), ("135M", "LoRA r16")] if args.quick else RUNS
    rows, measured = [], {}
    for size, setup in runs:
        run_dir = Path(args.out) / f"{size}-{setup.split()[0]}-{len(measured)}"
        shutil.rmtree(run_dir, ignore_errors=True)  # this benchmark's own earlier output
        try:
            with Sampler() as peak:
                run_training(config(run_dir, size=size, setup=setup))
        except RunError as exc:  # e.g. a worker killed for memory: say so, measure the rest
            rows.append([size, setup, "-", f"did not run: {str(exc)[:80]}", "", ""])
            continue
        count = parameters(run_dir) if setup != "LoRA r16" else _base_parameters(size)
        measured.setdefault(setup, []).append((count, peak.coordinator, peak.worker, peak.store))
        rows.append([size, setup, f"{count / 1e6:.0f}M", f"{peak.coordinator / 2**30:.2f}",
                     f"{peak.worker / 2**30:.2f}", f"{peak.store / 2**30:.2f}"])
        print(rows[-1], flush=True)
    print(markdown(["model", "setup", "parameters", "coordinator USS GiB", "worker USS GiB",
                    "object store GiB"], rows))
    print(markdown(["setup", "role", "fit: GiB + bytes/parameter"]
                   + [f"predicted {name} GiB" for name in PREDICT], prediction_rows(measured)))
    print("ratio: measured / predicted at each setup's largest model, by the fit of its smaller "
          "ones: " + ("; ".join(extrapolation_ratios(measured)) or "needs 3 sizes of a setup"))


def prediction_rows(measured: dict) -> list[list[str]]:
    rows = []
    for setup, points in measured.items():
        for role, index in (("coordinator", 1), ("worker", 2), ("object store", 3)):
            a, b = fit([(p[0], p[index]) for p in points])
            rows.append([setup, role, f"{a / 2**30:.2f} + {b:.1f} × P"]
                        + [f"{(a + b * n) / 2**30:.0f}" for n in PREDICT.values()])
    return rows


def extrapolation_ratios(measured: dict) -> list[str]:
    """How well the line extrapolates, which is what the 8B / 70B predictions do: for each
    setup measured at 3 or more sizes, the largest one's peak over what the fit of the
    smaller ones predicts for it (coordinator and worker)."""
    parts = []
    for setup, points in measured.items():
        if len(points) < 3:
            continue
        *smaller, largest = sorted(points)
        for role, index in (("coordinator", 1), ("worker", 2)):
            a, b = fit([(p[0], p[index]) for p in smaller])
            parts.append(f"{setup} {role} {largest[index] / (a + b * largest[0]):.2f}")
    return parts


def _base_parameters(size: str) -> int:
    """A LoRA run's versions hold the adapter: count the base model's parameters instead
    (built on the meta device: shapes only, no memory)."""
    import torch

    from workers.model import build_model

    with torch.device("meta"):
        model = build_model({**LLAMA, **SIZES[size], "vocab_size": 50257})
    return sum(p.numel() for p in model.parameters())


if __name__ == "__main__":
    main()
