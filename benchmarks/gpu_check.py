"""The GPU path in one short check: a real demo round per site on the device, then the merge.

    benchmarks/gpu_check.sh                      # on a machine with an NVIDIA GPU
    python benchmarks/gpu_check.py --device cpu --model tiny --steps 2   # its CPU twin

Two Workers (the plain class a Ray actor wraps) train one round each of `--steps` steps on
the demo's speeches and code sites with configs/deepspeed/gpu.json (bf16, ZeRO-2) on CUDA, or
cpu.json on CPU. Checked: every loss and delta value is finite; the merge of the two deltas
computed on the device equals Σ wᵢ·Δᵢ / Σ wᵢ computed apart in float64 NumPy, and (on CUDA)
trainer.merge.weighted_average on CPU, within fp32 rounding. The float64 reference is what
makes the CPU twin a check: there the device is the CPU, so device and CPU merge are one path.
Printed: tokens/s per worker, and MFU = 6 · parameters · tokens/s / the device's peak bf16
FLOP/s (dense; --peak-tflops overrides the table). With several GPUs (or --zero3-ranks N)
the speeches round is also trained by a site of N ranks at ZeRO-3 (configs/deepspeed/
zero3.json in fp32, every parameter partitioned), one GPU per rank, and its update, put
together from every rank's slice, is compared with the same round by one rank at ZeRO-0 on
the CPU; `--device cpu --zero3-ranks 2` is that path's CPU twin. Exit status 0 only if every
check passed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# Dense bf16 peak TFLOP/s by device name (vendor datasheets, without sparsity).
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 70.0,
               "L4": 121.0}
TINY = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "max_position_embeddings": 256}


def peak_tflops(device_name: str, override: float | None) -> float | None:
    if override:
        return override
    return next((v for k, v in PEAK_TFLOPS.items() if k in device_name), None)


def start_model(model_name: str):
    """(tokenizer, model, its config as a dict): SmolLM2 or a tiny random Llama."""
    from trainer.config import ModelConfig
    from trainer.model_source import load_start_model, load_tokenizer

    tokenizer = load_tokenizer("smollm2" if model_name == "smollm2" else "gpt2")
    source = ModelConfig(source="smollm2", tokenizer="smollm2") if model_name == "smollm2" \
        else ModelConfig(source="random", tokenizer="gpt2", architecture=TINY)
    model = load_start_model(source, tokenizer=tokenizer, seed=0)
    return tokenizer, model, model.config.to_dict()


def train_spec(ds_config: dict, *, steps: int, batch: int, seq_len: int):
    from workers.replay import ReplayConfig
    from workers.types import TrainSpec, WorkerConfig

    return TrainSpec(worker=WorkerConfig(local_steps=steps, batch_size=batch,
                                         seq_len=seq_len, lr=3e-5),
                     replay=ReplayConfig(ratio=0.0), deepspeed=ds_config, seed=0)


def demo_site(name: str, column: str):
    from workers.types import SiteConfig

    return SiteConfig(name, str(REPO / "data" / "demo" / name), column)


def train_sites(*, device: str, model_name: str, steps: int, batch: int, seq_len: int):
    """(global weights, [update per site], parameter count, device name)."""
    import torch

    from workers.types import Cursor
    from workers.worker import Worker

    tokenizer, model, config = start_model(model_name)
    weights = {n: p.detach().numpy().copy() for n, p in model.named_parameters()}
    ds_file = "gpu.json" if device == "cuda" else "cpu.json"
    ds_config = json.loads((REPO / "configs" / "deepspeed" / ds_file).read_text())
    train = train_spec(ds_config, steps=steps, batch=batch, seq_len=seq_len)
    updates = []
    for name, column in (("speeches", "text"), ("code", "source")):
        worker = Worker(site=demo_site(name, column), model_config=config, tokenizer=tokenizer,
                        train=train)
        updates.append(worker.train_round(worker.plan(round_index=1, cursor=Cursor()),
                                          weights))
        del worker
    name = torch.cuda.get_device_name(0) if device == "cuda" else "cpu"
    return weights, updates, sum(a.size for a in weights.values()), name


def zero3_site(*, device: str, ranks: int, model_name: str, steps: int, batch: int,
               seq_len: int) -> dict[str, float]:
    """One round of the speeches site trained by `ranks` Ray worker actors as one DeepSpeed
    ZeRO-3 group (one GPU each on CUDA), every parameter partitioned, in fp32 so that its
    update can be compared with the CPU twin's: the same round by one worker at ZeRO-0 on the
    CPU. Returns the update's difference from it (max absolute, and relative L2) and the
    site's tokens/s."""
    import numpy as np
    import ray

    from cluster.connect import NAMESPACE
    from trainer.fleet import combine_ranks
    from trainer.sites import start_site
    from workers.types import Cursor
    from workers.worker import Worker

    tokenizer, model, config = start_model(model_name)
    weights = {n: p.detach().numpy().copy() for n, p in model.named_parameters()}
    zero3 = json.loads((REPO / "configs" / "deepspeed" / "zero3.json").read_text())
    zero3.pop("bf16")  # fp32: an exact comparison with the CPU's update
    zero3["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    cpu = json.loads((REPO / "configs" / "deepspeed" / "cpu.json").read_text())
    ray.init(namespace=NAMESPACE, include_dashboard=False)
    updates = {}
    for label, size, gpus, ds_config in (("zero3", ranks, 1 if device == "cuda" else 0, zero3),
                                         ("reference", 1, 0, cpu)):
        train = train_spec(ds_config, steps=steps, batch=batch, seq_len=seq_len)
        site = start_site(
            worker_cls=Worker, site=f"check-{label}", size=size,
            num_cpus=1 if device == "cuda" else 2 / size, num_gpus=gpus, resources={},
            make_kwargs=lambda group, train=train: {
                "site": demo_site("speeches", "text"), "model_config": config,
                "tokenizer": tokenizer, "train": train, "group": group})
        task = ray.get(site.actors[0].plan.remote(round_index=1, cursor=Cursor()))
        answers = ray.get([a.train_round.remote(task, weights) for a in site.actors])
        updates[label] = combine_ranks(answers[0], answers[1:]) if size > 1 else answers[0]
        site.kill()
    ray.shutdown()
    got, want = updates["zero3"].delta, updates["reference"].delta
    diff = np.sqrt(sum(float(((got[k] - want[k]) ** 2).sum()) for k in want))
    norm = np.sqrt(sum(float((want[k] ** 2).sum()) for k in want))
    return {"max_abs": max(float(np.abs(got[k] - want[k]).max()) for k in want),
            "relative_l2": diff / norm, "tokens_per_s": updates["zero3"].metrics["tokens_per_s"]}


# How far the ZeRO-3 site's update may be from the CPU twin's (relative L2): on CPU only the
# order of the gradient sums differs (fp32 rounding, ~1e-6); on a GPU its kernels round
# differently too. A slice put in the wrong place or a rank on the wrong rows is ~1.
ZERO3_TOLERANCE = {"cpu": 1e-4, "cuda": 2e-2}


def check_zero3_site(args, *, ranks: int) -> list[str]:
    found = zero3_site(device=args.device, ranks=ranks, model_name=args.model,
                       steps=args.steps, batch=args.batch, seq_len=args.seq_len)
    print(f"ZeRO-3 site of {ranks} ranks on {args.device} (fp32): "
          f"{found['tokens_per_s']:,.0f} tokens/s; its update vs one CPU rank at ZeRO-0: "
          f"max |difference| {found['max_abs']:.2e}, relative L2 {found['relative_l2']:.2e}")
    limit = ZERO3_TOLERANCE[args.device]
    if found["relative_l2"] <= limit:
        return []
    return [(f"the ZeRO-3 site's update differs from the CPU twin's by "
             f"{found['relative_l2']:.3g} (relative L2, allowed {limit:g})")]


def reference_merge(updates) -> dict:
    """Σ wᵢ·Δᵢ / Σ wᵢ in float64 NumPy, written apart from trainer.merge so that a broken
    merge cannot agree with itself."""
    import numpy as np

    total = sum(float(u.weight) for u in updates)
    return {key: sum(float(u.weight) * u.delta[key].astype(np.float64) for u in updates) / total
            for key in updates[0].delta}


def merge_errors(updates, *, device: str) -> dict[str, float]:
    """Largest |device merge − reference| over every value, relative to the merge's scale:
    against the float64 reference, and against the CPU merge when the device is not the CPU."""
    import torch

    from trainer.merge import weighted_average

    pairs = [({k: torch.from_numpy(v) for k, v in u.delta.items()}, u.weight) for u in updates]
    on_device = weighted_average([({k: v.to(device) for k, v in d.items()}, w)
                                  for d, w in pairs])
    on_device = {k: v.cpu().double().numpy() for k, v in on_device.items()}
    references = {"float64 reference": reference_merge(updates)}
    if device != "cpu":
        references["CPU"] = {k: v.double().numpy() for k, v in weighted_average(pairs).items()}
    errors = {}
    for label, reference in references.items():
        scale = max(float(abs(a).max()) for a in reference.values()) or 1.0
        errors[label] = max(float(abs(on_device[k] - a).max()) for k, a in reference.items()) \
            / scale
    return errors


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--model", choices=["smollm2", "tiny"], default="smollm2")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--peak-tflops", type=float, default=None)
    parser.add_argument("--zero3-ranks", type=int, default=None,
                        help="also train a ZeRO-3 site of this many ranks (default: every GPU "
                             "when there are several, none on CPU)")
    args = parser.parse_args()
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device here: run the CPU twin with --device cpu", file=sys.stderr)
        return 2
    if args.device == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from trainer.demo import prepare_demo

    prepare_demo(REPO / "data" / "demo")
    _, updates, params, name = train_sites(
        device=args.device, model_name=args.model, steps=args.steps, batch=args.batch,
        seq_len=args.seq_len)
    import math

    import numpy as np

    problems = []
    for update in updates:
        losses = update.metrics["loss"]
        finite = math.isfinite(losses) and all(np.isfinite(d).all() for d in update.delta.values())
        if not finite:
            problems.append(f"{update.worker_id}: non-finite loss or delta")
    errors = merge_errors(updates, device=args.device)
    problems += [f"device merge differs from the {label} merge by {error:.3g} (relative)"
                 for label, error in errors.items() if not error <= 1e-6]
    peak = peak_tflops(name, args.peak_tflops)
    print(f"device: {name}; model: {args.model} ({params / 1e6:.1f} M parameters); "
          f"{args.steps} steps × {args.batch} × {args.seq_len} tokens per site")
    for update in updates:
        rate = update.metrics["tokens_per_s"]
        mfu = f"{6 * params * rate / (peak * 1e12):.3f}" if peak else "n/a (unknown peak)"
        print(f"  {update.worker_id}: loss {update.metrics['loss']:.3f}, {rate:,.0f} tokens/s, "
              f"MFU {mfu}")
    for label, error in errors.items():
        print(f"merge on {args.device} vs {label}: max relative difference {error:.2e}")
    ranks = args.zero3_ranks
    if ranks is None:
        count = torch.cuda.device_count() if args.device == "cuda" else 0
        ranks = min(count, 8) if count > 1 else 0
    if ranks > 1:
        problems += check_zero3_site(args, ranks=ranks)
    print("PASS" if not problems else "FAIL: " + "; ".join(problems))
    return 0 if not problems else 1


if __name__ == "__main__":
    sys.exit(main())
