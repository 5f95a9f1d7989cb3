"""Training tokens/s of a Tributary site of 2 ranks at ZeRO-3 against bare DeepSpeed ZeRO-3 on the
same model, DeepSpeed config and batch shape, measured in one run.

    python benchmarks/zero3_throughput.py            # 3 pairs, ~6 min on 2 cores
    python benchmarks/zero3_throughput.py --pairs 1  # ~2 min
    python benchmarks/zero3_throughput.py --against glibc  # the malloc threshold's cost


Tributary: a run of one site, `num_workers: 2`, configs/deepspeed/cpu.json at ZeRO-3 (every
parameter partitioned), `--rounds` rounds of `--steps` steps of 4 × 128 tokens (2 per rank),
no replay; its speed is the positions trained per second of the worker's training time
(metrics.jsonl: steps × batch × seq_len / train_seconds, the time of the round's optimizer
steps, Tributary's batch building and learning-rate schedule included), median over the
rounds after the first. Bare: two Ray actors, each a DeepSpeed engine built under
`zero.Init` from the same config and model, stepping the same number of batches of the same
shape (random token ids) in a plain forward/backward/step loop, in processes started with the
allocator setting Tributary's workers get (`worker.malloc_mmap_threshold: auto`), timed
over the same count of steps, median over as many blocks after a first. Each pair runs one then the other (the order
alternating), never both at once; the ratio printed is Tributary / bare, median of the pairs.

`--against glibc` pairs the same Tributary run (whose `worker.malloc_mmap_threshold: auto` fixes
glibc's mmap threshold at 65536 for a ZeRO-3 site on CPU) against itself with `glibc` (glibc's
dynamic threshold) instead of bare DeepSpeed: the speed that the fixed threshold, which lets
ZeRO-3's host memory per rank divide by the ranks, costs.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import ray

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
DEMO = REPO / "data" / "demo"
ARCH = {"model_type": "llama", "hidden_size": 384, "intermediate_size": 1024,
        "num_hidden_layers": 8, "num_attention_heads": 6, "num_key_value_heads": 2,
        "max_position_embeddings": 256, "tie_word_embeddings": True}
BATCH, SEQ_LEN, RANKS, VOCAB = 4, 128, 2, 50257


def ds_config() -> dict:
    config = json.loads((REPO / "configs" / "deepspeed" / "cpu.json").read_text())
    config["zero_optimization"] = {"stage": 3, "stage3_param_persistence_threshold": 0}
    return config


def tributary(out: Path, *, rounds: int, steps: int, threshold: int | str = "auto") -> float:
    """Median positions/s of the site's training time over rounds 2.. of one run."""
    from trainer.config import config_from_dict, resolve_paths
    from trainer.coordinator import run_training
    from trainer.metrics import read_metrics

    run_dir = out / "tributary"
    shutil.rmtree(run_dir, ignore_errors=True)  # this benchmark's own earlier output
    raw = {"run": {"dir": str(run_dir), "seed": 0}, "rounds": rounds,
           "model": {"source": "random", "tokenizer": "gpt2", "architecture": ARCH},
           "sites": [{"name": "speeches", "path": str(DEMO / "speeches"),
                      "num_workers": RANKS}],
           "worker": {"local_steps": steps, "batch_size": BATCH, "seq_len": SEQ_LEN,
                      "lr": 1e-4, "prox_mu": 0, "num_cpus": 2 / RANKS,
                      "malloc_mmap_threshold": threshold, "deepspeed": ds_config()},
           "replay": {"ratio": 0.0, "capacity_tokens": 4096},
           "merge": {"min_workers": 1}}
    run_training(resolve_paths(config_from_dict(raw)))
    speeds = [r["steps"]["speeches"] * BATCH * SEQ_LEN / r["train_seconds"]["speeches"]
              for r in read_metrics(run_dir)[2:]]  # [0] is v0000, [1] round 1 (warm-up)
    shutil.rmtree(run_dir, ignore_errors=True)
    return statistics.median(speeds)


@ray.remote
class BareRank:
    """One rank of a plain DeepSpeed ZeRO-3 job: no Tributary code on the training path."""

    def __init__(self, *, rank: int, port: int, config: dict) -> None:
        import os

        import deepspeed
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM
        from transformers.integrations import HfDeepSpeedConfig

        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                          WORLD_SIZE=str(RANKS), LOCAL_RANK="0", LOCAL_SIZE="0")
        torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}",
                                             rank=rank, world_size=RANKS)
        deepspeed.init_distributed(dist_backend="gloo", verbose=False)
        torch.manual_seed(0)
        self.zero3 = HfDeepSpeedConfig(config)  # models are built under zero.Init
        arch = dict(ARCH)
        model = AutoModelForCausalLM.from_config(
            AutoConfig.for_model(arch.pop("model_type"), vocab_size=VOCAB, **arch),
            dtype=torch.float32)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        self.engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
        self.rank = rank

    def train(self, ids: np.ndarray) -> float:
        """Seconds for one step per batch of `ids` [steps, batch, seq_len] (this rank's rows)."""
        import torch

        self.engine.train()
        started = time.perf_counter()
        for batch in torch.from_numpy(ids[:, self.rank::RANKS]):
            loss = self.engine(input_ids=batch, labels=batch).loss
            self.engine.backward(loss)
            self.engine.step()
        return time.perf_counter() - started


def bare(*, blocks: int, steps: int) -> float:
    """Median positions/s over `blocks` blocks of `steps` steps after a first."""
    from workers.engine import free_port
    from workers.types import WorkerConfig

    port, config = free_port(), ds_config()
    # The same allocator setting as Tributary's workers get by default (auto: a fixed mmap
    # threshold for ZeRO-3 on CPU): the comparison is of the training path, not of glibc.
    threshold = WorkerConfig().mmap_threshold(zero_stage=3)
    env = {} if threshold is None else {"MALLOC_MMAP_THRESHOLD_": str(threshold)}
    ranks = [BareRank.options(num_cpus=2 / RANKS, runtime_env={"env_vars": env}).remote(
        rank=r, port=port, config=config) for r in range(RANKS)]
    ids = np.random.default_rng(0).integers(0, VOCAB, (steps, BATCH, SEQ_LEN))
    speeds = []
    for _ in range(blocks + 1):
        seconds = max(ray.get([r.train.remote(ids) for r in ranks]))
        speeds.append(steps * BATCH * SEQ_LEN / seconds)
    for r in ranks:
        ray.kill(r)
    return statistics.median(speeds[1:])


def main() -> None:
    from trainer.demo import prepare_demo

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--out", default=str(REPO / "runs" / "bench-zero3"))
    parser.add_argument("--against", choices=("bare", "glibc"), default="bare",
                        help="the baseline: bare DeepSpeed, or Tributary with glibc's own "
                             "malloc threshold")
    args = parser.parse_args()
    prepare_demo(DEMO)
    ray.init(num_cpus=2, include_dashboard=False)  # the runs join this cluster
    out, rounds, steps = Path(args.out), args.rounds, args.steps
    baseline = {"bare": lambda: bare(blocks=rounds - 1, steps=steps),
                "glibc": lambda: tributary(out, rounds=rounds, steps=steps, threshold="glibc")
                }[args.against]
    label = {"bare": "bare DeepSpeed", "glibc": "Tributary, glibc's own malloc threshold"}
    ratios = []
    for pair in range(args.pairs):
        order = ["tributary", "baseline"] if pair % 2 == 0 else ["baseline", "tributary"]
        speed = {}
        for which in order:
            speed[which] = (tributary(out, rounds=rounds, steps=steps)
                            if which == "tributary" else baseline())
        ratios.append(speed["tributary"] / speed["baseline"])
        print(f"pair {pair + 1}: Tributary {speed['tributary']:.0f} positions/s, "
              f"{label[args.against]} {speed['baseline']:.0f}, ratio {ratios[-1]:.3f}",
              flush=True)
    print(f"ratio Tributary / {label[args.against]}, ZeRO-3, 2 ranks (median of "
          f"{len(ratios)} pairs): {statistics.median(ratios):.3f} "
          f"(pairs: {', '.join(f'{r:.3f}' for r in ratios)})")


if __name__ == "__main__":
    main()
