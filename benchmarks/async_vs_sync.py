"""merge.mode async against sync: the same sites, data and token budget, sites of different speed.

    python benchmarks/async_vs_sync.py            # 5 pairs per scenario, ~1 hour
    python benchmarks/async_vs_sync.py --quick    # 1 pair, half the data: a smoke test

Two sites on this machine's two cores, one worker (one core) each, the same number of new
tokens each (`--updates` of the slow site's updates), a randomly initialised Llama of ~8M
parameters with GPT-2's tokenizer:
  fast  16 local steps per update (of 4 x 64 tokens, a quarter of them replayed);
  slow  64 local steps per update: 4x the work per update, set with `sites[].worker`.
Speed comes from real work, not sleeps. In sync mode every round waits for the slow site,
then the fast one trains its remaining data alone (one core idle); in async mode the fast
site never waits. Sync evaluates (and writes weights) every round, as its gate needs; async
every `--eval-every` versions (default 4), the knob async mode has for this, and both
evaluate the last version, whose perplexities are compared.

Scenarios:
  steady  both sites up;
  stall   the fast site's worker process is stopped (SIGSTOP: a node that stops answering)
          once version 3 is published. Sync waits merge.round_timeout_s for it; async goes
          on. Both restart it after the timeout and it trains its rows again.

Per run it prints the wall time until every site consumed its budget (the run's own, from
start-up to the last version), new tokens per second over that time, the final held-out
perplexity per eval set, forgetting (a set's final perplexity over its best at any version,
minus 1, averaged over the sets), and per pair the ratios sync/async (time) and async/sync
(perplexity). Runs alternate sync, async within a pair; pair k uses seed k (model
initialisation, sampling); medians, min and max over the pairs.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import sys
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/summaries.py
from summaries import mean_sd, median_range

from cluster.connect import connect
from trainer.config import config_from_dict, resolve_paths
from trainer.coordinator import run_training
from trainer.demo import prepare_demo
from trainer.metrics import read_metrics
from trainer.model_source import load_tokenizer
from trainer.table import markdown
from workers.increments import increment_files, read_texts
from workers.worker import Worker

REPO = Path(__file__).resolve().parents[1]
ARCH = {"model_type": "llama", "hidden_size": 128, "intermediate_size": 256,
        "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
        "max_position_embeddings": 128, "tie_word_embeddings": True}
STEPS = {"fast": 16, "slow": 64}
BATCH, SEQ_LEN, REPLAY = 4, 64, 0.25
TIMEOUT_S = 60.0  # merge.round_timeout_s: ~3.5x the slow site's update; what sync waits for a stalled site
STALL_AT = 3  # the version after which the fast site stalls
EVAL_TOKENS = 1024  # per eval set


def pid_reporting(folder: Path) -> type:
    """The Worker, writing its process id to folder/<site> when it starts (so the stall
    scenario can stop the fast site's current process, a restarted one included)."""

    class PidWorker(Worker):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"{self.site.name}.tmp").write_text(str(os.getpid()))
            (folder / f"{self.site.name}.tmp").rename(folder / self.site.name)

    return PidWorker


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="1 pair, half the data")
    parser.add_argument("--pairs", type=int, help="sync/async pairs per scenario (default 5)")
    parser.add_argument("--updates", type=int,
                        help="the slow site's updates; every site gets as many tokens "
                             "(default 4, quick 2)")
    parser.add_argument("--scenarios", nargs="+", default=["steady", "stall"],
                        choices=["steady", "stall"])
    parser.add_argument("--eval-every", type=int, default=4,
                        help="async mode's run.eval_every (sync evaluates every round; both "
                             "evaluate the last version)")
    parser.add_argument("--out", default=str(REPO / "runs" / "bench-async"))
    args = parser.parse_args()
    pairs = args.pairs or (1 if args.quick else 5)
    updates = args.updates or (2 if args.quick else 4)
    out = Path(args.out)
    demo = REPO / "data" / "demo"
    prepare_demo(demo)
    sites = write_sites(demo, out / "data", updates=updates)
    connect(num_cpus=2, include_dashboard=False)
    results: dict[str, list[dict]] = {}
    for scenario in args.scenarios:
        for pair in range(pairs):
            for mode in ("sync", "async"):
                run_dir = out / "runs" / f"{scenario}-{pair}-{mode}"
                summary = run_once(sites, demo, run_dir, mode=mode, seed=pair,
                                   eval_every=args.eval_every,
                                   stall=scenario == "stall")
                results.setdefault(f"{scenario}/{mode}", []).append(summary)
                print(f"{run_dir.name}: {summary['wall_s']:.1f} s, "
                      f"{summary['tokens_per_s']:.0f} new tokens/s, mean perplexity "
                      f"{summary['mean_ppl']:.2f}", flush=True)
        (out / "results.json").write_text(json.dumps(results, indent=1))
    text = report(results, scenarios=args.scenarios, eval_every=args.eval_every)
    (out / "report.md").write_text(text + "\n")
    print(text)


def write_sites(demo: Path, root: Path, *, updates: int) -> dict[str, Path]:
    """Each site's folder: the same number of new tokens, `updates` slow-site updates' worth,
    in files of one slow update each (speeches for `slow`, stdlib code for `fast`)."""
    tokenizer = load_tokenizer("gpt2")
    per_update = STEPS["slow"] * (BATCH - round(REPLAY * BATCH)) * SEQ_LEN
    texts = {"slow": rows_of(demo / "speeches", "text"), "fast": rows_of(demo / "code", "source")}
    folders = {}
    for site, rows in texts.items():
        folder = root / site
        shutil.rmtree(folder, ignore_errors=True)  # this benchmark's own earlier output
        folder.mkdir(parents=True)
        rows = iter(rows)
        for k in range(updates):
            taken, total = [], 0
            while total < per_update:
                row = next(rows)
                taken.append(row)
                total += len(tokenizer(row, add_special_tokens=False)["input_ids"]) + 1
            pq.write_table(pa.table({"text": taken}), folder / f"{k:02d}.parquet")
        folders[site] = folder
    return folders


def rows_of(folder: Path, column: str) -> list[str]:
    """The folder's rows cut into pieces of at most 2 lines' worth of a sequence."""
    rows = []
    for file in increment_files(folder):
        for text in read_texts(file, text_column=column):
            rows += [text[i:i + 2 * SEQ_LEN * 4] for i in range(0, len(text), 2 * SEQ_LEN * 4)]
    return [r for r in rows if r.strip()]


def config_for(sites: dict[str, Path], demo: Path, run_dir: Path, *, mode: str, seed: int,
               eval_every: int):
    raw = {
        # Sync evaluates every round (its gate needs it); run.eval_every is async's knob.
        "run": {"dir": str(run_dir), "seed": seed,
                "eval_every": eval_every if mode == "async" else 1},
        "rounds": None,  # until every site has consumed its folder
        "model": {"source": "random", "tokenizer": "gpt2", "architecture": ARCH},
        "sites": [{"name": name, "path": str(path),
                   "worker": {"local_steps": STEPS[name]}} for name, path in sites.items()],
        "eval": [{"name": "speeches", "path": str(demo / "eval" / "speeches_newest.parquet"),
                  "max_tokens": EVAL_TOKENS, "newest": True},
                 {"name": "code", "path": str(demo / "eval" / "code.jsonl"),
                  "text_column": "source", "max_tokens": EVAL_TOKENS},
                 {"name": "shakespeare", "path": str(demo / "eval" / "shakespeare.txt"),
                  "max_tokens": EVAL_TOKENS}],
        "worker": {"batch_size": BATCH, "seq_len": SEQ_LEN, "lr": 1e-3, "num_cpus": 1,
                   "deepspeed": str(REPO / "configs" / "deepspeed" / "cpu.json")},
        "replay": {"ratio": REPLAY, "capacity_tokens": 1 << 18},
        "merge": {"mode": mode, "min_workers": 1, "round_timeout_s": TIMEOUT_S,
                  "buffer": 1, "staleness_exponent": 0.5, "max_staleness": 16,
                  # The norm check compares an update with the median of the round's others:
                  # with two sites, the slow site's last few-token update makes the fast
                  # site's ordinary one look like an outlier and sync loses that round.
                  "max_norm_ratio": 100.0},
        "cluster": {"include_dashboard": False},
    }
    return resolve_paths(config_from_dict(raw))


def run_once(sites: dict[str, Path], demo: Path, run_dir: Path, *, mode: str, seed: int,
             eval_every: int, stall: bool) -> dict:
    for folder in (run_dir, run_dir.parent / f"{run_dir.name}-pids"):
        shutil.rmtree(folder, ignore_errors=True)  # this benchmark's own earlier output
    stopper = None
    if stall:
        stopper = threading.Thread(target=stall_fast_site, args=(run_dir,), daemon=True)
        stopper.start()
    started = time.perf_counter()
    run_training(config_for(sites, demo, run_dir, mode=mode, seed=seed,
                            eval_every=eval_every),
                 worker_cls=pid_reporting(run_dir.parent / f"{run_dir.name}-pids"))
    wall = time.perf_counter() - started
    if stopper is not None:
        stopper.join(timeout=5)
    return summarize(read_metrics(run_dir), wall=wall)


def stall_fast_site(run_dir: Path) -> None:
    """SIGSTOP the fast site's worker process once version STALL_AT is published (the
    coordinator's timeout then has Ray kill it, and the site restarts)."""
    deadline = time.monotonic() + 600
    while not (run_dir / "versions" / f"v{STALL_AT:04d}").exists():
        if time.monotonic() > deadline:
            return
        time.sleep(0.05)
    pid = int((run_dir.parent / f"{run_dir.name}-pids" / "fast").read_text())
    os.kill(pid, signal.SIGSTOP)


def summarize(records: list[dict], *, wall: float) -> dict:
    final = records[-1]
    ppl = final["eval_perplexity"]
    return {"wall_s": wall,
            "tokens_per_s": sum(sum(r["new_tokens"].values()) for r in records) / wall,
            "new_tokens": sum(sum(r["new_tokens"].values()) for r in records),
            "versions": final["round"], "perplexity": ppl, "mean_ppl": statistics.fmean(
                ppl.values()),
            "forgetting": statistics.fmean(final["forgetting"].values()),
            "failures": sum(len(r.get("failures") or {}) for r in records)}


def report(results: dict[str, list[dict]], *, scenarios: list[str], eval_every: int) -> str:
    lines = [(f"sync evaluates and writes every round; async every {eval_every}th version "
              "and the last"), ""]
    ratios = []  # the closing ratio line: one entry per scenario, medians over the pairs
    for scenario in scenarios:
        sync, asyn = results[f"{scenario}/sync"], results[f"{scenario}/async"]
        sets = list(sync[0]["perplexity"])
        header = ["mode", "wall s", "new tokens/s", *[f"ppl {s}" for s in sets], "mean ppl",
                  "forgetting", "versions"]
        rows = [[mode, _med(runs, "wall_s", 1), _med(runs, "tokens_per_s", 0),
                 *[_fmt(statistics.median(r["perplexity"][s] for r in runs), 2) for s in sets],
                 _med(runs, "mean_ppl", 2), _med(runs, "forgetting", 3), _med(runs, "versions", 0)]
                for mode, runs in (("sync", sync), ("async", asyn))]
        speedup = [s["wall_s"] / a["wall_s"] for s, a in zip(sync, asyn, strict=True)]
        quality = [a["mean_ppl"] / s["mean_ppl"] for s, a in zip(sync, asyn, strict=True)]
        difference = [a["mean_ppl"] - s["mean_ppl"] for s, a in zip(sync, asyn, strict=True)]
        tokens = {r["new_tokens"] for r in sync + asyn}
        ratio = median_range(quality, "{:.3f}")
        lines += [f"### {scenario} ({len(sync)} pairs; medians)", "", markdown(header, rows), "",
                  f"- wall time sync / async: {median_range(speedup)}",
                  f"- mean perplexity async / sync: {ratio}; mean ± sd "
                  + mean_sd(quality, "{:.3f}"),
                  "- mean perplexity async − sync, paired: mean ± sd "
                  + mean_sd(difference, "{:+.1f}"),
                  f"- new tokens trained per run: {sorted(tokens)}", ""]
        ratios.append(f"{scenario}: sync / async wall time {median_range(speedup)}, "
                      f"mean perplexity async / sync {ratio}")
    return "\n".join([*lines, "ratio: " + "; ".join(ratios)])


def _med(runs: list[dict], key: str, digits: int) -> str:
    return _fmt(statistics.median(r[key] for r in runs), digits)


def _fmt(value: float, digits: int) -> str:
    return f"{value:.{digits}f}"


if __name__ == "__main__":
    main()
