"""Merge throughput against this machine's copy bandwidth, measured in the same run.

    python benchmarks/merge.py            # K = 2, 4, 8 deltas shaped like SmolLM2-135M
    python benchmarks/merge.py --quick    # a quarter of the layers

Reading K fp32 deltas and writing one result moves (K + 1) × P × 4 bytes: that is the floor.
The baseline is a plain tensor copy of the same model (2 × P × 4 bytes) timed right before, so
the ratio says how close `weighted_average(..., out=)` comes to the memory's speed whatever
else shares the machine. A naive average (one temporary per term, fresh output each round) is
the second baseline, and the robust strategies are timed at the largest K.
"""

from __future__ import annotations

import argparse
import time

import torch

from trainer.merge import median, trimmed_mean, weighted_average
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


def best_of(repeats: int, run) -> float:
    """The fastest of `repeats` timings: the least disturbed by other load."""
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return min(times)


def naive_average(updates):
    total = sum(w for _, w in updates)
    return {k: sum(state[k] * (w / total) for state, w in updates) for k in updates[0][0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    shapes = model_shapes(LAYERS // 4 if args.quick else LAYERS)
    params = sum(torch.Size(s).numel() for s in shapes.values())
    generator = torch.Generator().manual_seed(0)
    pool = [{k: torch.randn(s, generator=generator) * 1e-3 for k, s in shapes.items()}
            for _ in range(8)]
    out = {k: torch.empty(s) for k, s in shapes.items()}
    gb = params * 4 / 1e9
    print(f"{params / 1e6:.1f} M parameters ({gb:.2f} GB per fp32 state), "
          f"{torch.get_num_threads()} threads")
    rows, last = [], {}
    for k in (2, 4, 8):
        updates = [(pool[i], float(i + 1)) for i in range(k)]
        copy_s = best_of(args.repeats, lambda: [out[n].copy_(pool[0][n]) for n in shapes])
        merge_s = best_of(args.repeats, lambda u=updates: weighted_average(u, out=out))
        naive_s = best_of(args.repeats, lambda u=updates: naive_average(u))
        copy_bw, merge_bw = 2 * gb / copy_s, (k + 1) * gb / merge_s
        last = {"k": k, "ratio": merge_bw / copy_bw, "naive": naive_s / merge_s}
        rows.append([str(k), f"{merge_s:.3f}", f"{merge_bw:.1f}", f"{copy_bw:.1f}",
                     f"{merge_bw / copy_bw:.2f}", f"{naive_s:.3f}", f"{naive_s / merge_s:.1f}x"])
    print(markdown(["K", "merge s", "merge GB/s", "copy GB/s", "merge/copy", "naive s",
                    "naive/merge"], rows))
    updates = [(pool[i], 1.0) for i in range(8)]
    robust = {"trimmed_mean (10%)": lambda: trimmed_mean(updates, trim_fraction=0.1, out=out),
              "median": lambda: median(updates, out=out)}
    fedavg_s = best_of(args.repeats, lambda: weighted_average(updates, out=out))
    for name, run in robust.items():
        seconds = best_of(1, run)
        print(f"K=8 {name}: {seconds:.2f} s, {seconds / fedavg_s:.1f}x the weighted average")
    print(f"ratio: merge bandwidth / copy bandwidth at K={last['k']}: {last['ratio']:.2f} "
          f"(naive averaging is {last['naive']:.1f}x slower)")


if __name__ == "__main__":
    main()
