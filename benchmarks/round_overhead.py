"""Time outside training, and a worker's throughput against a bare DeepSpeed loop.

    python benchmarks/round_overhead.py            # H = 10, 50, 200 local steps, ~4 min
    python benchmarks/round_overhead.py --quick    # H = 10, 50

Two workers train configs/tiny.yaml's model for 2 rounds at each H; a round's overhead is its
wall time minus the slowest worker's time inside training steps (dispatch, data reading,
the delta, merge, evaluation, checkpoint). Then the same model, batch and DeepSpeed config
run as a bare `engine(batch); backward; step` loop in this process, and a Tributary worker's
tokens/s is compared with it (1.0: no cost over plain DeepSpeed).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import time
from pathlib import Path

import torch

from cluster.connect import connect
from trainer.config import deepspeed_dict, load_config, resolve_paths
from trainer.coordinator import run_training
from trainer.demo import prepare_demo
from trainer.metrics import read_metrics
from trainer.model_source import load_start_model, load_tokenizer
from trainer.table import markdown
from workers import engine as ds

REPO = Path(__file__).resolve().parents[1]


def tiny_config(run_dir: Path, *, steps: int):
    return resolve_paths(load_config(REPO / "configs" / "tiny.yaml", overrides=[
        f"run.dir={run_dir}", "rounds=2", f"worker.local_steps={steps}",
        f"worker.deepspeed={REPO / 'configs' / 'deepspeed' / 'cpu.json'}",
        "cluster.include_dashboard=false"]))


def bare_deepspeed_tokens_per_s(config, *, steps: int) -> float:
    """The same model, batch shape and DeepSpeed config in a plain training loop."""
    tokenizer = load_tokenizer(config.model.tokenizer)
    torch.set_num_threads(int(config.worker.num_cpus))  # what a worker actor gets
    model = load_start_model(config.model, tokenizer=tokenizer, seed=0)
    ds.init_single_rank_group()
    w = config.worker
    engine = ds.build_engine(model, ds_config=deepspeed_dict(w), lr=w.lr,
                             weight_decay=w.weight_decay, micro_batch=w.batch_size)
    ids = torch.randint(0, len(tokenizer), (w.batch_size, w.seq_len))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    for _ in range(3):  # warm-up
        engine.backward(engine(**batch).loss)
        engine.step()
    started = time.perf_counter()
    for _ in range(steps):
        engine.backward(engine(**batch).loss)
        engine.step()
    return steps * w.batch_size * w.seq_len / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default=str(REPO / "runs" / "bench-overhead"))
    args = parser.parse_args()
    prepare_demo(REPO / "data" / "demo")
    connect(num_cpus=2, include_dashboard=False)
    rows, rates = [], []
    for steps in (10, 50) if args.quick else (10, 50, 200):
        run_dir = Path(args.out) / f"h{steps}"
        shutil.rmtree(run_dir, ignore_errors=True)  # this benchmark's own earlier output
        run_training(tiny_config(run_dir, steps=steps))
        for record in read_metrics(run_dir)[1:]:
            train = max(record["train_seconds"].values())
            rows.append([str(steps), str(record["round"]), f"{record['round_seconds']:.2f}",
                         f"{train:.2f}", f"{record['overhead_seconds']:.2f}",
                         f"{train / record['round_seconds']:.2f}"])
            rates += list(record["tokens_per_s"].values())
    print(markdown(["H", "round", "round s", "slowest training s", "overhead s",
                    "training share"], rows))
    bare = bare_deepspeed_tokens_per_s(tiny_config(Path(args.out) / "bare", steps=50), steps=50)
    worker = statistics.median(rates)
    print(f"bare DeepSpeed loop: {bare:.0f} tokens/s; Tributary workers (median of "
          f"{len(rates)} worker rounds): {worker:.0f} tokens/s")
    print(f"ratio: Tributary worker tokens/s / bare DeepSpeed tokens/s = {worker / bare:.2f}")


if __name__ == "__main__":
    main()
