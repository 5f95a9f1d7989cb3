"""Continual-learning quality on the real demo data with SmolLM2-135M: four arms, one budget.

    python benchmarks/continual_quality.py            # about 15 min on 2 CPU cores
    python benchmarks/continual_quality.py --quick    # a smaller stream, under 5 min

The stream: R rounds; in round k the speeches site receives paragraphs of one era (decades
spread from the 1790s to the 2010s) and the code site one group of stdlib modules. Every arm
trains on this stream through Tributary's own run loop (real Ray, real DeepSpeed) with the same
number of optimizer steps of the same batch shape, i.e. the same token budget:

  (a) naive       one worker, the stream in order (each round's two increments shuffled
                  together), no replay, constant learning rate;
  (b) tributary   two sites federated and merged each round, replay 25 %, LR re-warm/re-decay;
  (c) joint       the oracle: one worker, every row of the stream shuffled into one file;
  (d) central     one worker on the stream of (a), with the replay and schedule of (b): the
                  difference to (b) is the cost of federating and merging.

Each round's increments are sized to what a worker without replay reads in one round, so (a)
and (c) take the whole stream; with replay a quarter of every batch is old data, so (b) and (d)
read 3/4 of it in the same budget (replay displaces new data, as in Ibrahim et al. 2024) and
their last era arrives late. The table shows the new and replay tokens of each arm.

Eval sets: held-out paragraphs of each era (the rows right after those trained), stdlib modules
never trained on, and Shakespeare. Forgetting is Tributary's: a set's final perplexity over its
best perplexity at any version, minus 1. Results go to OUT/results.json and the tables below.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from cluster.connect import connect
from trainer.config import config_from_dict, resolve_paths
from trainer.coordinator import run_training
from trainer.demo import prepare_demo
from trainer.metrics import read_metrics
from trainer.model_source import load_tokenizer
from trainer.table import markdown
from workers.increments import increment_files, read_texts

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Size:
    rounds: int
    steps: int  # per site and round in the federated arm; a single worker takes twice as many
    batch: int
    seq_len: int
    eval_tokens: int
    lr: float = 3e-4  # continual pre-training strength: enough to forget without replay


FULL = Size(rounds=4, steps=6, batch=4, seq_len=128, eval_tokens=1024)
QUICK = Size(rounds=2, steps=2, batch=4, seq_len=64, eval_tokens=256)
ARMS = ("naive", "tributary", "joint", "central")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a small stream, under 5 minutes")
    parser.add_argument("--data", default=str(REPO / "data" / "demo"), help="demo data folder")
    parser.add_argument("--out", default=str(REPO / "runs" / "bench-quality"))
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS)
    parser.add_argument("--lr", type=float, help="peak inner learning rate of every arm")
    parser.add_argument("--strategy", default="fedavg", help="merge.strategy of the federated arm")
    parser.add_argument("--keep-versions", action="store_true",
                        help="keep every arm's model versions (about 0.5 GB each)")
    args = parser.parse_args()
    size = QUICK if args.quick else FULL
    if args.lr:
        size = dataclasses.replace(size, lr=args.lr)
    out = Path(args.out) / ("quick" if args.quick else "full")
    prepare_demo(Path(args.data))
    stream = build_stream(Path(args.data), out / "data", size=size)
    connect(num_cpus=2, include_dashboard=False)
    results = {}
    for arm in args.arms:
        started = time.perf_counter()
        run_dir = out / "runs" / arm
        shutil.rmtree(run_dir, ignore_errors=True)  # this benchmark's own earlier output
        run_training(arm_config(arm, stream, run_dir, size=size, strategy=args.strategy))
        results[arm] = summarize(read_metrics(run_dir), seconds=time.perf_counter() - started)
        if not args.keep_versions:  # metrics.jsonl is all the tables need; weights are GBs
            for folder in ("versions", "replay", "sites"):
                shutil.rmtree(run_dir / folder, ignore_errors=True)
        print(f"arm {arm}: {results[arm]['seconds']:.0f} s", flush=True)
    text = report(results, eval_sets=list(stream.eval), newest=stream.newest)
    (out / "results.json").write_text(json.dumps(
        {"size": size.__dict__, "eval": {k: str(v) for k, v in stream.eval.items()},
         "arms": results}, indent=1))
    (out / "report.md").write_text(text + "\n")
    print(text)


# ---------------------------------------------------------------- the stream


@dataclass(frozen=True)
class Stream:
    sites: dict[str, Path]  # federated arm: speeches/ and code/ with one file per round
    combined: Path  # the same increments, one shuffled file per round, for one worker
    shuffled: Path  # every row of the stream in one shuffled file (the joint oracle)
    eval: dict[str, Path]
    newest: str  # the eval set of the last era


def build_stream(data: Path, root: Path, *, size: Size) -> Stream:
    """Per round one era of speeches and one group of code, each sized to one round's budget
    of a no-replay worker (steps × batch × seq_len tokens), plus held-out sets."""
    tokenizer = load_tokenizer("smollm2")
    budget = size.steps * size.batch * size.seq_len
    eras = spread(increment_files(data / "speeches"), size.rounds)
    code = spread(increment_files(data / "code"), size.rounds)
    rounds, evals = [], {}
    piece = 2 * size.seq_len  # characters: about half a sequence, so rounds end near budget
    for k, (era_file, code_file) in enumerate(zip(eras, code, strict=True), start=1):
        speeches = pieces(read_texts(era_file, text_column="text"), max_chars=piece)
        taken = take_tokens(speeches, tokenizer, budget)
        held_out = speeches[len(taken):]
        era = era_file.stem
        evals[f"era_{era}"] = write_rows(root / "eval" / f"era_{era}.parquet", held_out)
        sources = take_tokens(pieces(read_texts(code_file, text_column="source"),
                                     max_chars=piece), tokenizer, budget)
        rounds.append({"speeches": taken, "code": sources})
        for site, rows in rounds[-1].items():
            write_rows(root / site / f"{k:02d}.parquet", rows)
        mixed = taken + sources
        random.Random(k).shuffle(mixed)
        write_rows(root / "stream" / f"{k:02d}.parquet", mixed)
    everything = [row for r in rounds for rows in r.values() for row in rows]
    random.Random(0).shuffle(everything)
    write_rows(root / "joint" / "all.parquet", everything)
    evals["code"] = data / "eval" / "code.jsonl"
    evals["shakespeare"] = data / "eval" / "shakespeare.txt"
    return Stream(sites={"speeches": root / "speeches", "code": root / "code"},
                  combined=root / "stream", shuffled=root / "joint", eval=evals,
                  newest=f"era_{eras[-1].stem}")


def spread(files: list[Path], count: int) -> list[Path]:
    """`count` files evenly spaced from the first to the last."""
    step = (len(files) - 1) / max(1, count - 1)
    return [files[round(i * step)] for i in range(count)]


def pieces(rows: list[str], *, max_chars: int) -> list[str]:
    """Rows cut at line ends into pieces of at most `max_chars` (a round never splits a row,
    so small rows let every arm stop close to the same token budget)."""
    out = []
    for row in rows:
        current = ""
        for line in row.splitlines(keepends=True):
            while len(line) > max_chars:  # one very long line: cut it hard
                out.append(line[:max_chars])
                line = line[max_chars:]
            if len(current) + len(line) > max_chars and current.strip():
                out.append(current)
                current = ""
            current += line
        if current.strip():
            out.append(current)
    return out


def take_tokens(rows: list[str], tokenizer, budget: int) -> list[str]:
    """Leading rows whose tokens (with one EOS each) first reach `budget`."""
    taken, total = [], 0
    for row in rows:
        if total >= budget:
            break
        taken.append(row)
        total += len(tokenizer(row, add_special_tokens=False)["input_ids"]) + 1
    return taken


def write_rows(path: Path, rows: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"text": rows}), path)
    return path


# ---------------------------------------------------------------- the arms


def arm_config(arm: str, stream: Stream, run_dir: Path, *, size: Size,
               strategy: str = "fedavg"):
    replay = arm in ("tributary", "central")
    single = {"naive": stream.combined, "joint": stream.shuffled, "central": stream.combined}
    if arm == "tributary":
        sites = [{"name": name, "path": str(path)} for name, path in stream.sites.items()]
        steps, cpus = size.steps, 1
    else:
        sites = [{"name": "stream", "path": str(single[arm])}]
        steps, cpus = 2 * size.steps, 2
    # The oracle sees one shuffled file: one warm-up and one cosine over the whole run.
    decay = steps * size.rounds if arm == "joint" else steps
    schedule = ({"kind": "rewarm", "warmup_steps": 1, "decay_steps": decay, "min_lr_ratio": 0.1}
                if arm != "naive" else {"kind": "constant"})
    raw = {
        "run": {"dir": str(run_dir), "seed": 0},
        "rounds": size.rounds,
        "model": {"source": "smollm2", "tokenizer": "smollm2"},
        "sites": sites,
        "eval": [{"name": name, "path": str(path), "max_tokens": size.eval_tokens,
                  "newest": name == stream.newest,
                  **({"text_column": "source"} if name == "code" else {})}
                 for name, path in stream.eval.items()],
        "worker": {"local_steps": steps, "batch_size": size.batch, "seq_len": size.seq_len,
                   "lr": size.lr, "num_cpus": cpus, "lr_schedule": schedule,
                   "deepspeed": str(REPO / "configs" / "deepspeed" / "cpu.json")},
        "replay": {"ratio": 0.25 if replay else 0.0, "capacity_tokens": 1 << 20},
        "merge": {"min_workers": len(sites), "strategy": strategy},
    }
    return resolve_paths(config_from_dict(raw))


# ---------------------------------------------------------------- results


def summarize(records: list[dict], *, seconds: float) -> dict:
    final = records[-1]
    return {"perplexity": final["eval_perplexity"], "forgetting": final["forgetting"],
            "start": records[0]["eval_perplexity"],
            "max_forgetting": {name: max(r["forgetting"][name] for r in records)
                               for name in final["forgetting"]},
            "new_tokens": sum(sum(r["new_tokens"].values()) for r in records),
            "replay_tokens": sum(sum(r["replay_tokens"].values()) for r in records),
            "backward_transfer": final.get("backward_transfer"),
            "newest_gain": final.get("newest_gain"), "seconds": seconds}


def report(results: dict, *, eval_sets: list[str], newest: str) -> str:
    arms = [a for a in ARMS if a in results]
    mean = {a: sum(results[a]["perplexity"].values()) / len(eval_sets) for a in arms}
    ppl = [[a, *(f"{results[a]['perplexity'][s]:.2f}" for s in eval_sets), f"{mean[a]:.2f}",
            f"{results[a]['new_tokens']}/{results[a]['replay_tokens']}",
            f"{results[a]['seconds']:.0f}"] for a in arms]
    start = results[arms[0]]["start"]
    ppl.insert(0, ["(start)", *(f"{start[s]:.2f}" for s in eval_sets),
                   f"{sum(start.values()) / len(eval_sets):.2f}", "", ""])
    forget = [[a, *(f"{results[a]['forgetting'][s]:.3f}" for s in eval_sets),
               _fmt(results[a]["backward_transfer"]), _fmt(results[a]["newest_gain"])]
              for a in arms]
    lines = ["Final perplexity per eval set (newest era: " + newest + ")",
             markdown(["arm", *eval_sets, "mean", "tokens new/replay", "s"], ppl), "",
             "Forgetting at the end (final / best - 1), backward transfer and newest gain",
             markdown(["arm", *eval_sets, "bwt", "gain"], forget), ""]
    lines += ratio_lines(results, mean, eval_sets=eval_sets, newest=newest)
    return "\n".join(lines)


def ratio_lines(results: dict, mean: dict, *, eval_sets: list[str], newest: str) -> list[str]:
    lines = []
    if {"naive", "tributary"} <= set(results):
        old = [s for s in eval_sets if s != newest]
        total = {a: sum(results[a]["forgetting"][s] for s in old) for a in ("naive", "tributary")}
        ratio = total["tributary"] / total["naive"] if total["naive"] else float("nan")
        lines.append(f"forgetting, tributary / naive (sum over older sets): {ratio:.2f}")
    for other in ("joint", "central"):
        if {"tributary", other} <= set(results):
            lines.append(f"mean perplexity, tributary / {other}: "
                         f"{mean['tributary'] / mean[other]:.4f}")
    return lines


def _fmt(value: float | None) -> str:
    return "" if value is None else f"{value:+.3f}"


if __name__ == "__main__":
    main()
