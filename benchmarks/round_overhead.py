"""Time outside training (per round and before the first), and a worker's tokens/s against a
bare DeepSpeed loop.

    python benchmarks/round_overhead.py            # ~6 min on 2 cores
    python benchmarks/round_overhead.py --quick    # 2 rounds, 2 pairs (smoke test)

Rounds: a 16M-parameter GPT-2 (4 layers, width 256, GPT-2's vocabulary), 2 sites on the demo
data, 5 rounds of 5 AdamW steps of 8 × 128 tokens. A round's overhead is its wall time minus
its slowest worker's time inside training steps, round 1 (first weights, first steps)
included; the coordinator's and workers' own clocks say where it went (metrics.jsonl
`round_parts` and the per-site read/load/delta seconds). Start-up, and the wait for the last
version's evaluation and write after the last round (which a longer run overlaps with its next
round): RUN_DIR/timing.json.

Throughput: the same model, batch shape (8 × 128 tokens, no replay) and DeepSpeed config, in
two Ray actors of 1 CPU each, used one at a time: a Tributary worker's round of H steps
(its `tokens_per_s`: tokens over the seconds inside its training loop) and a bare
`engine(batch); backward; step` loop of H steps. They alternate in pairs after one warm-up
each; the ratio is taken per pair, then its median, min and max.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import ray
import torch

from cluster.connect import connect
from trainer.config import config_from_dict, deepspeed_dict, resolve_paths
from trainer.coordinator import run_training
from trainer.demo import prepare_demo
from trainer.metrics import read_metrics
from trainer.model_source import load_tokenizer
from trainer.table import markdown
from workers import engine as ds
from workers.model import build_model
from workers.types import Cursor
from workers.worker import ACTOR_OPTIONS, Worker

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "data" / "demo"
# GPT-2's vocabulary, 4 layers of width 256: 16.2M parameters (12.9M of them the embedding).
GPT2 = {"model_type": "gpt2", "n_embd": 256, "n_layer": 4, "n_head": 4, "n_positions": 128,
        "tie_word_embeddings": True}
STEPS, BATCH, SEQ_LEN = 5, 8, 128


def workload(run_dir: Path, *, rounds: int, steps: int = STEPS, replay: float = 0.25):
    return resolve_paths(config_from_dict({
        "run": {"dir": str(run_dir), "seed": 0},
        "rounds": rounds,
        "model": {"source": "random", "tokenizer": "gpt2", "architecture": GPT2},
        "sites": [{"name": "speeches", "path": str(DEMO / "speeches")},
                  {"name": "code", "path": str(DEMO / "code"), "text_column": "source"}],
        "eval": [{"name": "speeches_newest", "max_tokens": 1024, "newest": True,
                  "path": str(DEMO / "eval" / "speeches_newest.parquet")},
                 {"name": "code", "path": str(DEMO / "eval" / "code.jsonl"),
                  "text_column": "source", "max_tokens": 1024}],
        "worker": {"local_steps": steps, "batch_size": BATCH, "seq_len": SEQ_LEN,
                   "lr": 1e-3, "num_cpus": 1,
                   "deepspeed": str(REPO / "configs" / "deepspeed" / "cpu.json")},
        "replay": {"ratio": replay, "capacity_tokens": 1 << 18},
        "merge": {"min_workers": 2},
        "cluster": {"include_dashboard": False},
    }))


def round_table(run_dir: Path) -> tuple[str, list[float]]:
    """Each round's wall time, training, overhead and where the overhead went."""
    rows, shares = [], []
    for r in read_metrics(run_dir)[1:]:
        train = max(r["train_seconds"].values())
        parts = r["round_parts"]
        worker = max(r[k][s] for k in ("read_seconds", "load_seconds", "delta_seconds")
                     for s in r[k])
        shares.append(r["overhead_seconds"] / r["round_seconds"])
        rows.append([str(r["round"]), f"{r['round_seconds']:.2f}", f"{train:.2f}",
                     f"{r['overhead_seconds']:.2f}", f"{100 * shares[-1]:.1f}",
                     f"{parts['broadcast']:.3f}",
                     # Waiting for the previous version overlaps the workers' training.
                     f"{parts['previous_version'] + parts['gather'] - train:.3f}",
                     f"{worker:.3f}",
                     f"{parts['merge']:.3f}", f"{parts['commit']:.3f}",
                     f"{parts['evaluate'] + parts['validate']:.3f}"])
    headers = ["round", "round s", "slowest training s", "overhead s", "overhead %",
               "broadcast", "collect past training",
               "of it: worker read+load+delta (max)", "merge", "commit", "validate+evaluate"]
    return markdown(headers, rows), shares


def startup_table(run_dir: Path) -> str:
    timing = json.loads((run_dir / "timing.json").read_text())
    s = timing["startup"]
    engines = [w["engine"] for w in s["worker_init"].values()]
    rows = [["Ray start", f"{s['ray']:.2f}"],
            ["coordinator: tokenizer, model, eval sets, replay store", f"{s['coordinator']:.2f}"],
            ["workers started (actors, DeepSpeed)", f"{s['workers']:.2f}"],
            ["of it: a worker's DeepSpeed engine (max)", f"{max(engines):.2f}"],
            ["beside it: version 0 evaluated and written", f"{s['first_version']:.2f}"],
            ["then the wait for version 0", f"{s['first_version_wait']:.2f}"],
            ["after the last round: its version's evaluation and write",
             f"{timing['finish']['last_version']:.2f}"]]
    return markdown(["outside the rounds", "seconds"], rows)


class BareLoop:
    """The same model and DeepSpeed config in a plain loop (a Ray actor of 1 CPU)."""

    def __init__(self, *, model_config: dict, train) -> None:
        torch.manual_seed(0)
        w = train.worker
        ds.init_single_rank_group()
        self.engine = ds.build_engine(build_model(model_config), ds_config=deepspeed_dict(w),
                                      lr=w.lr, weight_decay=w.weight_decay,
                                      micro_batch=w.batch_size)
        ids = torch.randint(0, model_config["vocab_size"], (w.batch_size, w.seq_len))
        self.batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}

    def tokens_per_s(self, steps: int) -> float:
        started = time.perf_counter()
        for _ in range(steps):
            self.engine.backward(self.engine(**self.batch).loss)
            self.engine.step()
        ids = self.batch["input_ids"]
        return steps * ids.numel() / (time.perf_counter() - started)


def throughput_pairs(*, pairs: int, steps: int) -> list[tuple[float, float]]:
    """(worker tokens/s, bare tokens/s) per pair, after one warm-up of each."""
    config = workload(Path(tempfile.mkdtemp()) / "run", rounds=1, steps=steps, replay=0.0)
    tokenizer = load_tokenizer("gpt2")
    model_config = build_model({**GPT2, "vocab_size": len(tokenizer)}).config.to_dict()
    site, train = config.sites[0], config.train_spec(config.sites[0].name)
    state = tempfile.mkdtemp()
    worker = ray.remote(num_cpus=1, **ACTOR_OPTIONS)(Worker).remote(
        site=site, model_config=model_config, tokenizer=tokenizer, train=train, state_dir=state)
    bare = ray.remote(num_cpus=1)(BareLoop).remote(model_config=model_config, train=train)
    weights = ray.put({n: p.detach().numpy() for n, p in
                       build_model(model_config).named_parameters()})
    cursor, results = Cursor(), []
    for index in range(pairs + 1):  # the first pair warms both up
        task = ray.get(worker.plan.remote(round_index=index + 1, cursor=cursor))
        update = ray.get(worker.train_round.remote(task, weights))
        ray.get(worker.commit.remote(round_index=index + 1))
        cursor = update.cursor
        bare_rate = ray.get(bare.tokens_per_s.remote(steps))
        if index:
            results.append((update.metrics["tokens_per_s"], bare_rate))
    for actor in (worker, bare):
        ray.kill(actor)
    shutil.rmtree(state, ignore_errors=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--pairs", type=int, default=None, help="throughput pairs (default 7)")
    parser.add_argument("--steps", type=int, default=20, help="steps per throughput round")
    parser.add_argument("--out", default=str(REPO / "runs" / "bench-overhead"))
    args = parser.parse_args()
    pairs = args.pairs or (2 if args.quick else 7)
    prepare_demo(DEMO)
    run_dir = Path(args.out) / "rounds"
    shutil.rmtree(run_dir, ignore_errors=True)  # this benchmark's own earlier output
    run_training(workload(run_dir, rounds=2 if args.quick else 5))
    table, shares = round_table(run_dir)
    print(table)
    print(startup_table(run_dir))
    connect(num_cpus=2, include_dashboard=False)
    rates = throughput_pairs(pairs=pairs, steps=args.steps)
    ratios = [w / b for w, b in rates]
    print(markdown(["pair", "worker tokens/s", "bare DeepSpeed tokens/s", "worker / bare"],
                   [[str(i + 1), f"{w:.0f}", f"{b:.0f}", f"{w / b:.3f}"]
                    for i, (w, b) in enumerate(rates)]))
    print(f"ratio: round overhead / round time, median over rounds (incl. round 1) = "
          f"{statistics.median(shares):.3f} (max {max(shares):.3f}); worker / bare DeepSpeed "
          f"tokens/s, median of {len(ratios)} pairs = {statistics.median(ratios):.3f} "
          f"({min(ratios):.3f}–{max(ratios):.3f})")


if __name__ == "__main__":
    main()
