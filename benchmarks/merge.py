"""Merge throughput against this machine's copy bandwidth, measured in the same run.

    python benchmarks/merge.py            # K = 2, 4, 8, 16 deltas shaped like SmolLM2-135M
    python benchmarks/merge.py --quick    # a quarter of the layers, 3 pairs

Reading K fp32 deltas and writing one result moves (K + 1) × P × 4 bytes: that is the floor.
Each repetition times plain tensor copies of the same model (2 × P × 4 bytes each, repeated
about (K + 1) / 2 times, so the copy moves as many bytes as the merge and meets the same
noise for as long) right before the merge as the run calls it (`FedAvg.combine`:
`weighted_average(..., out=)` on inputs the merger validated), so each pair's ratio says how
close the merge comes to the memory's speed whatever else shares the machine; the table gives
the median, min and max over the pairs. Three baselines run in the same pairs: torch's block
path (the merge's path where the one-pass kernel is not built or does not take the inputs;
the merge before the kernel, but for its products now rounded apart, as the kernel's), the
per-tensor loop before that (each weighted add re-reads and rewrites the whole output: ~3K
model sizes of traffic) and a naive average (a temporary per term, a fresh output each time).
The robust strategies are timed warm (one untimed run first) at K = 8.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/summaries.py
from summaries import median_range

from trainer.merge import blocked_weighted_sum, finite_problem, median, trimmed_mean
from trainer.strategies import FedAvg
from trainer.table import markdown

# SmolLM2-135M: hidden 576, MLP 1536, 30 layers, 49152-token vocabulary (tied embeddings).
HIDDEN, MLP, KV, VOCAB, LAYERS = 576, 1536, 192, 49152, 30


def model_shapes(layers: int) -> dict[str, tuple[int, ...]]:
    shapes = {"embed": (VOCAB, HIDDEN), "norm": (HIDDEN,)}
    for i in range(layers):
        shapes |= {f"{i}.q": (HIDDEN, HIDDEN), f"{i}.k": (KV, HIDDEN), f"{i}.v": (KV, HIDDEN),
                   f"{i}.o": (HIDDEN, HIDDEN), f"{i}.gate": (MLP, HIDDEN),
                   f"{i}.up": (MLP, HIDDEN), f"{i}.down": (HIDDEN, MLP),
                   f"{i}.norm1": (HIDDEN,), f"{i}.norm2": (HIDDEN,)}
    return shapes


def timed(run) -> float:
    started = time.perf_counter()
    run()
    return time.perf_counter() - started


def per_tensor_loop(updates, out):
    """The merge before blocking, as it was: each input added over the whole tensor in turn,
    then the output read once more for its finite check."""
    total = sum(w for _, w in updates)
    for key in updates[0][0]:
        torch.mul(updates[0][0][key], updates[0][1] / total, out=out[key])
        for state, weight in updates[1:]:
            out[key].add_(state[key], alpha=weight / total)
        if finite_problem({key: out[key]}):
            raise ValueError(f"{key} holds NaN or Inf")


def naive_average(updates):
    total = sum(w for _, w in updates)
    return {k: sum(state[k] * (w / total) for state, w in updates) for k in updates[0][0]}


def weighted_average(updates, *, out):
    return FedAvg(lr=1.0).combine(updates, out=out)


def block_path(updates, *, out):
    total = sum(w for _, w in updates)
    blocked_weighted_sum(out, [s for s, _ in updates], [w / total for _, w in updates],
                         check_finite=False)


def merge_row(k: int, *, pool, out, gb: float, pairs: int) -> tuple[list[str], float]:
    """One K: `pairs` repetitions of copy, merge and the two baselines, interleaved."""
    updates = [(pool[i], float(i + 1)) for i in range(k)]
    names = list(out)
    copies = max(1, round((k + 1) / 2))  # the copies move about the merge's (K + 1) sizes
    weighted_average(updates, out=out)  # warm: pages touched, caches and threads started
    runs = {"copy": [], "merge": [], "block": [], "loop": [], "naive": []}
    for _ in range(pairs):
        runs["copy"].append(timed(lambda: [out[n].copy_(pool[c % len(pool)][n])
                                           for c in range(copies) for n in names]) / copies)
        runs["merge"].append(timed(lambda: weighted_average(updates, out=out)))
        runs["block"].append(timed(lambda: block_path(updates, out=out)))
        runs["loop"].append(timed(lambda: per_tensor_loop(updates, out)))
        runs["naive"].append(timed(lambda: naive_average(updates)))
    moved = (k + 1) * gb

    def of_copy(name: str) -> list[float]:  # bandwidth over the same pair's copy bandwidth
        return [(moved / m) / (2 * gb / c) for m, c in zip(runs[name], runs["copy"])]

    ratio, naive = of_copy("merge"), [n / m for n, m in zip(runs["naive"], runs["merge"])]
    row = [str(k), median_range([2 * gb / c for c in runs["copy"]], "{:.1f}"),
           median_range([moved / m for m in runs["merge"]], "{:.1f}"), median_range(ratio),
           median_range(of_copy("block")), median_range(of_copy("loop")),
           median_range(naive, "{:.1f}")]
    return row, statistics.median(ratio)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--pairs", type=int, default=None, help="repetitions (default 7; 3 quick)")
    args = parser.parse_args()
    pairs = args.pairs or (3 if args.quick else 7)
    shapes = model_shapes(LAYERS // 4 if args.quick else LAYERS)
    params = sum(torch.Size(s).numel() for s in shapes.values())
    generator = torch.Generator().manual_seed(0)
    pool = [{k: torch.randn(s, generator=generator) * 1e-3 for k, s in shapes.items()}
            for _ in range(16)]
    out = {k: torch.empty(s) for k, s in shapes.items()}
    gb = params * 4 / 1e9
    print(f"{params / 1e6:.1f} M parameters ({gb:.2f} GB per fp32 state), "
          f"{torch.get_num_threads()} threads, {pairs} pairs per row: median (min–max)")
    rows, ratios = [], {}
    for k in (2, 4, 8, 16):
        row, ratios[k] = merge_row(k, pool=pool, out=out, gb=gb, pairs=pairs)
        rows.append(row)
    print(markdown(["K", "copy GB/s", "merge GB/s", "merge/copy", "torch block path/copy",
                    "per-tensor loop/copy", "naive s / merge s"], rows))
    robust_table(pool=pool, out=out, pairs=pairs)
    print("ratio: merge bandwidth / copy bandwidth, median at K = 2, 4, 8, 16: "
          + ", ".join(f"{ratios[k]:.2f}" for k in ratios))


def robust_table(*, pool, out, pairs: int) -> None:
    """The robust strategies at K = 8, warm, each timed in a pair with the weighted average."""
    updates = [(pool[i], 1.0) for i in range(8)]
    robust = {"trimmed_mean (10%)": lambda: trimmed_mean(updates, trim_fraction=0.1, out=out),
              "median": lambda: median(updates, out=out)}
    rows = []
    for name, run in robust.items():
        run()  # warm
        fedavg, seconds = [], []
        for _ in range(pairs):
            fedavg.append(timed(lambda: weighted_average(updates, out=out)))
            seconds.append(timed(run))
        ratios = [s / f for s, f in zip(seconds, fedavg)]
        rows.append([name, median_range(seconds), median_range(ratios, "{:.1f}")])
    print(markdown(["K = 8, warm", "seconds", "× weighted average"], rows))


if __name__ == "__main__":
    main()
