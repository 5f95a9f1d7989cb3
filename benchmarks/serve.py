"""`tributary serve` under load, and the time from a version being published to being served.

    python benchmarks/serve.py            # tiny model and SmolLM2-135M, ~10 min on 2 cores
    python benchmarks/serve.py --quick    # tiny model, 2 pairs: a smoke test

For each model a run folder gets version v0000 (the config's start model, written by the
version writer as a run would), and one replica (2 CPUs, 2 torch threads) serves it on Ray
Serve. Throughput: at each concurrency level, pairs of (transformers `generate` in this
process, greedy, the same prompts and max_tokens one after another: the baseline) and (the
same requests through HTTP from that many concurrent clients); requests/s of each and their
ratio per pair, medians (min–max) over the pairs; latency percentiles pool every served
request of the level. Publish to serve: the version writer publishes a new version (the
weights nudged) and a client polls /health every 10 ms until the replica names it; the
baseline is loading that version with `from_pretrained` in this process, timed right after.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests
import torch
from transformers import AutoModelForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/summaries.py
from summaries import median_range

from cluster.connect import connect
from trainer import checkpoint
from trainer.config import dump_config, load_config, resolve_paths
from trainer.demo import prepare_demo
from trainer.model_source import load_start_model, load_tokenizer
from trainer.serve.app import start_serving
from trainer.serve.options import ServeOptions
from trainer.table import markdown

REPO = Path(__file__).resolve().parents[1]
MODELS = {"tiny": "configs/tiny.yaml", "smollm2": "configs/local.yaml"}
PROMPT = "The state of the Union is"
MAX_TOKENS = 16


def make_run(name: str, *, out: Path) -> tuple[Path, torch.nn.Module, object]:
    """A run folder holding v0000 of the config's start model."""
    run_dir = out / name
    shutil.rmtree(run_dir, ignore_errors=True)  # this benchmark's own earlier output
    config = resolve_paths(load_config(REPO / MODELS[name], overrides=[f"run.dir={run_dir}"]))
    tokenizer = load_tokenizer(config.model.tokenizer)
    model = load_start_model(config.model, tokenizer=tokenizer, seed=0)
    run_dir.mkdir(parents=True)
    dump_config(config, run_dir / "config.yaml")
    publish(run_dir, model=model, tokenizer=tokenizer, number=0)
    return run_dir, model.eval(), tokenizer


def publish(run_dir: Path, *, model, tokenizer, number: int) -> None:
    manifest = {"status": "accepted", "round": number,
                "parent": checkpoint.version_name(number - 1) if number else None}
    checkpoint.save_version(run_dir, number=number, model=model, tokenizer=tokenizer,
                            manifest=manifest)


def direct(model, tokenizer, *, count: int) -> float:
    """Requests/s of transformers greedy generation, one request after another."""
    ids = torch.tensor([tokenizer(PROMPT, add_special_tokens=False)["input_ids"]])
    started = time.perf_counter()
    with torch.inference_mode():
        for _ in range(count):
            model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                           max_new_tokens=MAX_TOKENS, min_new_tokens=MAX_TOKENS)
    return count / (time.perf_counter() - started)


def served(url: str, *, model: str, clients: int, count: int) -> tuple[float, list[float]]:
    """(requests/s, each request's latency) of `count` requests from `clients` clients,
    each answer checked to be MAX_TOKENS long (as the baseline's)."""
    local = threading.local()
    body = {"model": model, "prompt": PROMPT, "max_tokens": MAX_TOKENS, "temperature": 0}

    def one(_: int) -> float:
        session = getattr(local, "session", None) or requests.Session()
        local.session = session
        started = time.perf_counter()
        answer = session.post(f"{url}/v1/completions", json=body, timeout=300)
        answer.raise_for_status()
        seconds = time.perf_counter() - started
        tokens = answer.json()["usage"]["completion_tokens"]
        if tokens != MAX_TOKENS:
            raise RuntimeError(f"an answer of {tokens} tokens, not {MAX_TOKENS}: not comparable")
        return seconds

    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        latencies = list(pool.map(one, range(count)))
    return count / (time.perf_counter() - started), latencies


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def throughput(url: str, name: str, model, tokenizer, *, levels: list[int], pairs: int,
               per_client: int) -> tuple[list[list[str]], float]:
    rows, ratio_at_1 = [], None
    direct(model, tokenizer, count=2)  # warm both up: first calls pay one-off costs
    served(url, model=name, clients=1, count=2)
    for clients in levels:
        count = max(16, per_client * clients)  # enough requests for a stable rate
        base, rates, latencies = [], [], []
        for _ in range(pairs):
            base.append(direct(model, tokenizer, count=count))
            rate, seconds = served(url, model=name, clients=clients, count=count)
            rates.append(rate)
            latencies += seconds
        ratios = [r / b for r, b in zip(rates, base)]
        ratio_at_1 = statistics.median(ratios) if clients == 1 else ratio_at_1
        rows.append([str(clients), median_range(base), median_range(rates), median_range(ratios),
                     f"{percentile(latencies, 0.5) * 1000:.0f}",
                     f"{percentile(latencies, 0.99) * 1000:.0f}", str(len(latencies))])
    return rows, ratio_at_1


def publish_to_serve(url: str, run_dir: Path, model, tokenizer, *,
                     swaps: int) -> tuple[list[list[str]], float]:
    rows, ratios = [], []
    for number in range(1, swaps + 1):
        with torch.no_grad():
            for param in model.parameters():
                param.add_(torch.randn_like(param) * 1e-4)
        publish(run_dir, model=model, tokenizer=tokenizer, number=number)
        published = time.perf_counter()  # `latest` points at it now
        name = checkpoint.version_name(number)
        while True:
            health = requests.get(f"{url}/health", timeout=30).json()
            if health["version"] == name:
                break
            time.sleep(0.01)
        seen = time.perf_counter() - published
        swap = swap_seconds(url, name)
        started = time.perf_counter()
        AutoModelForCausalLM.from_pretrained(run_dir / "versions" / name, dtype=torch.float32)
        load = time.perf_counter() - started
        ratios.append(seen / load)
        rows.append([name, f"{seen:.3f}", f"{swap:.3f}", f"{load:.3f}", f"{seen / load:.2f}"])
    return rows, statistics.median(ratios)


def swap_seconds(url: str, name: str, *, timeout_s: float = 30) -> float:
    """The replica's own time for its swap to `name`. It records a swap just after making
    it, so /health can name the new version a moment before its swap is listed."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        swaps = requests.get(f"{url}/health", timeout=30).json()["swaps"]
        if swaps and swaps[-1]["version"] == name:
            return swaps[-1]["seconds"]
        time.sleep(0.01)
    raise RuntimeError(f"{url}/health: serving {name} but no swap to it listed in {timeout_s} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--levels", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--pairs", type=int, default=5)
    parser.add_argument("--per-client", type=int, default=4, help="requests per client")
    parser.add_argument("--swaps", type=int, default=5)
    parser.add_argument("--port", type=int, default=8123)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default=str(REPO / "runs" / "bench-serve"))
    args = parser.parse_args()
    if args.quick:
        args.models, args.levels, args.pairs, args.swaps = ["tiny"], [1, 4], 2, 2
    prepare_demo(REPO / "data" / "demo")
    torch.set_num_threads(2)
    connect(num_cpus=2, include_dashboard=False)
    from ray import serve

    for name in args.models:
        run_dir, model, tokenizer = make_run(name, out=Path(args.out))
        options = ServeOptions(run_dir=str(run_dir), port=args.port, num_cpus=2, poll_s=0.1)
        url = start_serving(options, app_name=f"bench-{name}")
        rows, ratio = throughput(url, run_dir.name, model, tokenizer, levels=args.levels,
                                 pairs=args.pairs, per_client=args.per_client)
        print(f"\n{name}: {sum(p.numel() for p in model.parameters()) / 1e6:.0f}M parameters, "
              f"greedy, {MAX_TOKENS} new tokens, 1 replica (2 CPUs); {args.pairs} pairs")
        print(markdown(["clients", "transformers alone req/s", "served req/s",
                        "served / alone", "p50 ms", "p99 ms", "requests"], rows))
        swap_rows, swap_ratio = publish_to_serve(url, run_dir, model, tokenizer,
                                                 swaps=args.swaps)
        print(markdown(["version", "published → served s", "replica's swap s",
                        "from_pretrained s", "served / load"], swap_rows))
        seen = statistics.median(float(r[1]) for r in swap_rows)
        print(f"ratio: {name}: served / transformers-alone requests/s at 1 client = "
              f"{ratio:.2f}; published → served {seen:.2f} s (median of {args.swaps}) = "
              f"{swap_ratio:.2f} x a bare from_pretrained load")
        serve.delete(f"bench-{name}")
    serve.shutdown()


if __name__ == "__main__":
    main()
