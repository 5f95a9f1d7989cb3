"""Peak memory per rank of a Tributary site at ZeRO-0, 1, 2 and 3 with 1, 2 and 4 ranks, on the
same model, measured on real runs.

    python benchmarks/memory.py --zero           # 24 runs, ~24 min on 2 cores
    python benchmarks/memory.py --zero --quick   # ZeRO-0 and ZeRO-3, 1 and 2 ranks
    python benchmarks/memory.py --zero --stages 0,3  # those stages only, 1, 2 and 4 ranks

Each run: one site of N ranks (one DeepSpeed group, fp32, torch AdamW) on the demo speeches,
1 round of 2 steps of 4 × 64 tokens, on this machine's local Ray cluster. A sampler reads the
USS (memory only that process holds) of every worker process (`ray::Worker…`, one per rank)
every 0.2 s; the table gives the largest rank's peak. Each setup runs twice: on the 135M-
parameter model and on a 0.4M one whose model states are negligible, so the difference of the
two peaks is the memory the model's states take on a rank (weights, gradients, AdamW moments,
ZeRO's fp32 partitions, buffers), with the process's fixed cost (Python, torch, DeepSpeed,
gloo) taken out by measurement rather than estimated. "÷ ZeRO-0, 1 rank" is that difference
over the same difference at ZeRO-0 on one rank, "÷ same stage, 1 rank" over the same stage's
on one rank: ZeRO-3 divides all model states over the ranks, so that approaches 1/N; ZeRO-1
divides only the optimizer's, ZeRO-2 also the gradients'.
On a GPU the same states sit in GPU memory (with bf16 weights and gradients, 2 bytes each).
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/sampling.py
from memory import LLAMA, SIZES
from sampling import Periodic, uss, worker_processes

from trainer.config import config_from_dict, resolve_paths
from trainer.coordinator import run_training
from trainer.table import markdown

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "data" / "demo"
MODELS = {"135M": SIZES["135M"],  # and one whose model states are negligible
          "floor": {"hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 1,
                    "num_attention_heads": 1, "num_key_value_heads": 1}}
STAGES, RANKS = (0, 1, 2, 3), (1, 2, 4)
# DeepSpeed's default communication buckets (5e8 elements) and ZeRO-3's cache of gathered
# parameters (up to 1e9 kept live) are sized for models of billions: for this 135M one they
# would hold the whole model on every rank. Sized here as they are for an 8B model, ~1/16 of it.
BUCKETS = {"reduce_bucket_size": 10_000_000, "allgather_bucket_size": 10_000_000,
           "stage3_prefetch_bucket_size": 10_000_000, "stage3_max_live_parameters": 10_000_000,
           "stage3_max_reuse_distance": 10_000_000}


class RankPeaks(Periodic):
    """The peak USS of each worker process (one per rank) while the block runs."""

    every_s = 0.2

    def __init__(self) -> None:
        self.peaks: dict[int, int] = {}

    def sample(self) -> None:
        for process in worker_processes():
            self.peaks[process.pid] = max(self.peaks.get(process.pid, 0), uss(process))


def config(run_dir: Path, *, model: str, stage: int, ranks: int):
    ds = {"train_micro_batch_size_per_gpu": 4 // ranks, "gradient_accumulation_steps": 1,
          "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0,
                                **BUCKETS},
          "steps_per_print": 1000000}
    raw = {
        "run": {"dir": str(run_dir), "seed": 0},
        "rounds": 1,
        "model": {"source": "random", "tokenizer": "gpt2",
                  "architecture": {**LLAMA, **MODELS[model]}},
        "sites": [{"name": "speeches", "path": str(DEMO / "speeches"), "num_workers": ranks}],
        "worker": {"local_steps": 2, "batch_size": 4, "seq_len": 64, "lr": 1e-4,
                   "prox_mu": 0, "num_cpus": 2 / ranks, "deepspeed": ds},
        "replay": {"ratio": 0.0, "capacity_tokens": 4096},
        "merge": {"min_workers": 1},
        "cluster": {"include_dashboard": False, "num_cpus": 2},
    }
    return resolve_paths(config_from_dict(raw))


def peak_per_rank(out: Path, *, model: str, stage: int, ranks: int) -> int:
    """The largest rank's peak USS (bytes) over one run."""
    run_dir = out / f"{model}-zero{stage}-{ranks}"
    shutil.rmtree(run_dir, ignore_errors=True)  # this benchmark's own earlier output
    with RankPeaks() as sampler:
        run_training(config(run_dir, model=model, stage=stage, ranks=ranks))
    shutil.rmtree(run_dir, ignore_errors=True)  # ~1 GB of optimizer states per run
    if len(sampler.peaks) < ranks:
        raise RuntimeError(f"saw {len(sampler.peaks)} worker processes, expected {ranks}")
    return max(sampler.peaks.values())


def run(out: Path, *, quick: bool, stages: tuple[int, ...] = STAGES) -> None:
    """`stages` must start with 0 (the first column's reference)."""
    stages, ranks = ((0, 3), (1, 2)) if quick else (stages, RANKS)
    rows, zero0, one_rank = [], None, {}
    for stage in stages:
        for count in ranks:
            full = peak_per_rank(out, model="135M", stage=stage, ranks=count)
            floor = peak_per_rank(out, model="floor", stage=stage, ranks=count)
            states = full - floor
            zero0 = zero0 or states  # ZeRO-0 on one rank comes first
            one_rank.setdefault(stage, states)  # each stage starts with one rank
            rows.append([f"ZeRO-{stage}", str(count), f"{full / 2**30:.2f}",
                         f"{floor / 2**30:.2f}", f"{states / 2**30:.2f}",
                         f"{states / zero0:.2f}", f"{states / one_rank[stage]:.2f}",
                         f"{1 / count:.2f}"])
            print(rows[-1], flush=True)
    print(markdown(["stage", "ranks", "peak per rank GiB (135M)", "same, 0.4M model GiB",
                    "model states per rank GiB", "÷ ZeRO-0, 1 rank", "÷ same stage, 1 rank",
                    "1/N"], rows))
