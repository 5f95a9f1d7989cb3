"""Traffic and quality of fp32, bf16 and int8 deltas: the same tiny run three times.

    python benchmarks/compression.py [--rounds 8] [--lr 5e-3]    # about 2 min

configs/tiny.yaml (a small random Llama, two sites on the demo data) runs once per
`merge.compression`; the table shows the bytes each worker sent per round and the held-out
loss at the end. fp32 is the baseline measured in the same run.
"""

from __future__ import annotations

import argparse
import math
import shutil
from pathlib import Path

from cluster.connect import connect
from trainer.config import load_config, resolve_paths
from trainer.coordinator import run_training
from trainer.demo import prepare_demo
from trainer.metrics import read_metrics
from trainer.table import markdown

REPO = Path(__file__).resolve().parents[1]
KINDS = ("fp32", "bf16", "int8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--lr", type=float, default=5e-3, help="inner lr: enough to move")
    parser.add_argument("--out", default=str(REPO / "runs" / "bench-compression"))
    args = parser.parse_args()
    prepare_demo(REPO / "data" / "demo")
    connect(num_cpus=2, include_dashboard=False)
    results = {}
    for kind in KINDS:
        run_dir = Path(args.out) / kind
        shutil.rmtree(run_dir, ignore_errors=True)  # this benchmark's own earlier output
        config = load_config(REPO / "configs" / "tiny.yaml", overrides=[
            f"run.dir={run_dir}", f"rounds={args.rounds}", f"merge.compression={kind}",
            f"worker.lr={args.lr}",
            f"worker.deepspeed={REPO / 'configs' / 'deepspeed' / 'cpu.json'}"])
        run_training(resolve_paths(config))
        results[kind] = read_metrics(run_dir)
    base = results["fp32"]
    rows = []
    for kind in KINDS:
        records = [r for r in results[kind] if r["round"] > 0]
        sent = sum(sum(r["bytes_sent"].values()) for r in records) / len(records)
        base_sent = sum(sum(r["bytes_sent"].values()) for r in base if r["round"] > 0) / len(
            records)
        final = results[kind][-1]["eval_perplexity"]
        loss = sum(math.log(v) for v in final.values()) / len(final)
        base_loss = sum(math.log(v) for v in base[-1]["eval_perplexity"].values()) / len(final)
        rows.append([kind, f"{sent / 1e6:.2f}", f"{sent / base_sent:.3f}", f"{loss:.4f}",
                     f"{loss - base_loss:+.4f}"])
    print(markdown(["deltas", "MB sent per round (all workers)", "vs fp32",
                    "final eval loss (mean log ppl)", "vs fp32"], rows))
    print(f"ratio: int8 bytes / fp32 bytes = {float(rows[2][2]):.3f}")


if __name__ == "__main__":
    main()
