"""Traffic and quality of compressed deltas (uplink) and global changes (downlink).

    python benchmarks/compression.py [--rounds 8] [--seeds 0 1 2]    # ~10 min on 2 cores
    python benchmarks/compression.py --quick                          # 2 rounds, 1 seed
    python benchmarks/compression.py --reuse                          # keep finished arms

configs/tiny.yaml (a small random Llama, two sites on the demo data) runs once per arm and
seed: fp32 both ways (the baseline, run with each seed in the same invocation), bf16 and int8
uplinks with error feedback, int8 without it (what error feedback buys), an int8 downlink, and
int8 both ways. Bytes are what the workers reported sending and receiving per round; the
downlink's first round is a full fp32 copy, so bytes received are shown for the rounds after
it and over all rounds. Loss is the final held-out loss (mean log perplexity of the eval
sets): mean ± sd over seeds, and its paired difference from fp32 with the same seed.
"""

from __future__ import annotations

import argparse
import math
import shutil
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/summaries.py
from summaries import mean_sd

from cluster.connect import connect
from trainer.config import load_config, resolve_paths
from trainer.coordinator import run_training
from trainer.demo import prepare_demo
from trainer.metrics import read_metrics
from trainer.table import markdown

REPO = Path(__file__).resolve().parents[1]
ARMS = {  # name -> config overrides
    "fp32": {},
    "up bf16": {"merge.compression": "bf16"},
    "up int8": {"merge.compression": "int8"},
    "up int8, no error feedback": {"merge.compression": "int8", "merge.error_feedback": False},
    "down int8": {"merge.downlink": "int8"},
    "up + down int8": {"merge.compression": "int8", "merge.downlink": "int8"},
}


def run_arm(name: str, *, seed: int, args) -> list[dict]:
    run_dir = Path(args.out) / f"{name.replace(' ', '_').replace(',', '')}-{seed}"
    if args.reuse and len(read_metrics(run_dir)) == args.rounds + 1:  # v0000 and each round
        return read_metrics(run_dir)
    shutil.rmtree(run_dir, ignore_errors=True)  # this benchmark's own earlier output
    overrides = [f"run.dir={run_dir}", f"run.seed={seed}", f"rounds={args.rounds}",
                 f"worker.lr={args.lr}",
                 f"worker.deepspeed={REPO / 'configs' / 'deepspeed' / 'cpu.json'}"]
    overrides += [f"{k}={v}" for k, v in ARMS[name].items()]
    run_training(resolve_paths(load_config(REPO / "configs" / "tiny.yaml", overrides=overrides)))
    return read_metrics(run_dir)


def per_worker_round(records: list[dict], key: str, *, first: bool) -> float:
    """Mean bytes per worker and round (the rounds after the first unless `first`)."""
    values = [b for r in records if r["round"] > (0 if first else 1)
              for b in r[key].values()]
    return statistics.mean(values)


def final_loss(records: list[dict]) -> float:
    final = records[-1]["eval_perplexity"]
    return sum(math.log(v) for v in final.values()) / len(final)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--lr", type=float, default=5e-3, help="inner lr: enough to move")
    parser.add_argument("--quick", action="store_true", help="2 rounds, seed 0 (smoke test)")
    parser.add_argument("--out", default=str(REPO / "runs" / "bench-compression"))
    parser.add_argument("--reuse", action="store_true",
                        help="keep the arms an earlier invocation finished (bytes and losses "
                        "are not timings: reusing them changes no figure)")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.seeds = 2, [0]
    prepare_demo(REPO / "data" / "demo")
    connect(num_cpus=2, include_dashboard=False)
    runs = {(name, seed): run_arm(name, seed=seed, args=args)
            for seed in args.seeds for name in ARMS}
    rows, summary = [], {}
    for name in ARMS:
        per_seed = [runs[name, s] for s in args.seeds]
        base = [runs["fp32", s] for s in args.seeds]
        sent = [per_worker_round(r, "bytes_sent", first=True) / per_worker_round(
            b, "bytes_sent", first=True) for r, b in zip(per_seed, base)]
        after = [per_worker_round(r, "bytes_received", first=False) / per_worker_round(
            b, "bytes_received", first=False) for r, b in zip(per_seed, base)]
        received = [per_worker_round(r, "bytes_received", first=True) / per_worker_round(
            b, "bytes_received", first=True) for r, b in zip(per_seed, base)]
        losses = [final_loss(r) for r in per_seed]
        paired = [100 * (final_loss(r) / final_loss(b) - 1) for r, b in zip(per_seed, base)]
        summary[name] = (statistics.mean(after), statistics.mean(paired))
        rows.append([name, f"{per_worker_round(per_seed[0], 'bytes_sent', first=True) / 1e6:.2f}",
                     mean_sd(sent, "{:.3f}"), mean_sd(after, "{:.3f}"), mean_sd(received, "{:.3f}"),
                     mean_sd(losses, "{:.4f}"), mean_sd(paired, "{:+.2f}")])
    print(f"{args.rounds} rounds, seeds {args.seeds}; bytes per worker and round, as a "
          "fraction of fp32 in the same seed")
    print(markdown(["arm", "MB sent (seed 0)", "sent / fp32", "received / fp32 (rounds 2+)",
                    "received / fp32 (all rounds)", "final eval loss", "loss vs fp32 (%)"],
                   rows))
    down, loss = summary["up + down int8"]
    print(f"ratio: int8 both ways: bytes received {down:.3f} x fp32 after the first round, "
          f"final loss {loss:+.2f} % vs fp32 (paired, mean of {len(args.seeds)} seeds)")


if __name__ == "__main__":
    main()
