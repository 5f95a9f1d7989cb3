"""Coordinator memory and merge time as workers are added: sharded against unsharded merging.

    python benchmarks/scale.py            # K = 2, 4, 8, 16 workers, ~3 min
    python benchmarks/scale.py --quick    # K = 2, 4

A two-node Ray cluster on this machine (ray.cluster_utils: each node its own raylet and
object store): the coordinator's node, and a node for the K simulated workers (Ray actors with
0.1 CPU each; a small Llama of ~20M parameters, one real SGD step on random tokens, no
DeepSpeed and no data files) that send their deltas each round. The unsharded arm is the
coordinator's own path (every whole delta fetched, validated and averaged in its process);
the sharded arm is `merge.reducers` (trainer/reduce.py; its reducers spread over both nodes,
as Ray places them). Each arm runs in a fresh coordinator process. All measured, in units of
the model's fp32 size: the private memory the coordinator's global weights and merger take
(RssAnon before the model is built and after a warm-up round; it includes what transformers
allocates once per process), the peak rise of its private memory in a round
(sampled every ms), and the bytes that land in its node's object store in a round (the
raylet's count of bytes created there: the broadcast put, and the deltas or combined slices
pulled in); their sum is what its node needs at the round's peak if nothing is evicted
meanwhile. Merge time runs from "every update is in" to the new global weights; medians over
`--rounds` rounds, memory the largest.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

import numpy as np
import ray
import torch
from ray.cluster_utils import Cluster
from sampling import Periodic, store_bytes_used

from cluster.connect import NAMESPACE
from trainer.merger import build_merger
from trainer.strategies import MergeConfig
from trainer.table import markdown
from workers.compression import split_payload
from workers.types import Cursor, WorkerUpdate

ARCH = {"model_type": "llama", "vocab_size": 32000, "hidden_size": 256,
        "intermediate_size": 1024, "num_hidden_layers": 4, "num_attention_heads": 4,
        "num_key_value_heads": 4, "max_position_embeddings": 128, "tie_word_embeddings": False}


def build_model() -> torch.nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(**ARCH)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config)


class SimulatedWorker:
    """One real optimizer step of the small model on random tokens; returns the delta whole
    or in slices, as a Tributary worker would."""

    def __init__(self, *, seed: int) -> None:
        torch.set_num_threads(1)
        self.model = build_model()
        self.generator = torch.Generator().manual_seed(seed)
        self.seed = seed

    def step(self, global_weights: dict) -> dict[str, np.ndarray]:
        with torch.no_grad():
            for name, param in self.model.named_parameters():
                param.copy_(torch.from_numpy(global_weights[name]))
        ids = torch.randint(0, ARCH["vocab_size"], (1, 32), generator=self.generator)
        self.model(input_ids=ids, labels=ids).loss.backward()
        delta = {}
        for name, param in self.model.named_parameters():
            delta[name] = (-1e-3 * param.grad).numpy().copy()
            param.grad = None
        return delta

    def round_whole(self, *, global_weights: dict) -> WorkerUpdate:
        return self._update(self.step(global_weights))

    def round_split(self, *, shards: list[list[str]], global_weights: dict) -> tuple:
        delta = self.step(global_weights)
        return (self._update({}), *split_payload(delta, shards))

    def read_only_broadcast(self, *, global_weights: dict) -> bool:
        """True if the weights arrived as read-only views of the node's object store."""
        return not any(a.flags.writeable for a in global_weights.values())

    def _update(self, delta: dict) -> WorkerUpdate:
        return WorkerUpdate(worker_id=f"w{self.seed:02d}", round=1, delta=delta,
                            weight=1000.0 + self.seed, consumed=(), cursor=Cursor(),
                            sequences=None, metrics={})


class PrivatePeak(Periodic):
    """The peak of this process's private memory (RssAnon) while the block runs, sampled
    every millisecond. (Shared object-store pages are counted apart: once touched they stay
    in RSS after their objects are freed, so RSS would overstate what is held.)"""

    def __enter__(self):
        self.base = self.peak = _rss_anon()
        return super().__enter__()

    def sample(self) -> None:
        self.peak = max(self.peak, _rss_anon())


def _rss_anon() -> int:
    with open("/proc/self/status") as handle:
        line = next(line for line in handle if line.startswith("RssAnon:"))
    return int(line.split()[1]) * 1024


class StoreLanded:
    """Bytes created in this node's object store while the block runs (its raylet's
    cumulative count): objects put here and objects pulled here from other nodes."""

    def __enter__(self):
        self.node = next(n for n in ray.nodes() if n["Alive"]
                         and n["NodeID"] == ray.get_runtime_context().get_node_id())
        self.before = self._created()
        return self

    def __exit__(self, *exc) -> None:
        self.bytes = self._created() - self.before

    def _created(self) -> int:
        from ray._private.internal_api import node_stats

        stats = node_stats(self.node["NodeManagerAddress"], self.node["NodeManagerPort"],
                           include_memory_info=False)
        return int(stats.store_stats.cumulative_created_bytes)


def merge_round(workers, merger, global_state) -> float:
    """One round through Tributary's merger (trainer/merger.py), as the coordinator runs it:
    every update in, then validate, propose, accept. Returns the merge seconds."""
    ref = ray.put({n: t.numpy() for n, t in global_state.items()})
    if merger.shards:
        shards = [list(names) for names in merger.shards]
        calls = [w.round_split.options(num_returns=len(shards) + 1).remote(
            shards=shards, global_weights=ref) for w in workers]
        firsts = [c[0] for c in calls]
    else:
        calls = firsts = [w.round_whole.remote(global_weights=ref) for w in workers]
    ray.wait(firsts, num_returns=len(firsts), fetch_local=False)
    started = time.perf_counter()
    updates = ray.get(firsts)
    parts = ({u.worker_id: c[1:] for u, c in zip(updates, calls, strict=True)}
             if merger.shards else {})
    accepted, _ = merger.validate(updates, parts)
    merger.propose(accepted, parts)
    merger.accept()
    return time.perf_counter() - started


def coordinator(*, arm: str, count: int, reducers: int, rounds: int) -> dict:
    """One arm at one K, in a fresh process joined to the benchmark's cluster (`--child`),
    on the coordinator's node: what its node holds, measured (see the module's text)."""
    before = _rss_anon()  # after imports, before any model
    global_state = {n: p.data for n, p in build_model().named_parameters()}
    model_bytes = sum(t.numel() * 4 for t in global_state.values())
    workers = [ray.get_actor(f"scale-sim-{i:02d}") for i in range(count)]
    merge = MergeConfig(max_norm_ratio=10.0, reducers=reducers if arm == "sharded" else 0)
    merger = build_merger(merge, weights=global_state)
    merge_round(workers, merger, global_state)  # warm-up: actors, buffers kept across rounds
    held = _rss_anon() - before
    seconds, private, store = [], [], []
    for _ in range(rounds):
        with PrivatePeak() as mine, StoreLanded() as node:
            seconds.append(merge_round(workers, merger, global_state))
        private.append(mine.peak - mine.base)
        store.append(node.bytes)
    held_x, private_x, store_x = (held / model_bytes, max(private) / model_bytes,
                                  max(store) / model_bytes)
    head = next(n["NodeID"] for n in ray.nodes() if n["Alive"] and "sites" not in n["Resources"])
    assert ray.get_runtime_context().get_node_id() == head, "the coordinator must run on the head"
    return {"held": held_x, "private": private_x, "store": store_x,
            "peak": held_x + private_x + store_x, "seconds": statistics.median(seconds),
            "model_bytes": model_bytes}


def run_child(*, arm: str, count: int, args: argparse.Namespace, address: str) -> dict:
    command = [sys.executable, __file__, "--child", arm, "--count", str(count), "--address",
               address, "--reducers", str(args.reducers), "--rounds", str(args.rounds)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    # Ray may print to stdout after the answer: take the JSON line.
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"{arm} K={count} failed:\n{done.stdout[-1000:]}{done.stderr[-3000:]}")
    return json.loads(lines[-1])


def broadcast_check(workers, global_state, model_bytes: int) -> str:
    """One ray.put read by every worker: one copy in each node's store (the coordinator's,
    and the workers' node it is pulled to), zero-copy reads."""
    before = store_bytes_used()
    ref = ray.put({n: t.numpy() for n, t in global_state.items()})
    zero_copy = ray.get([w.read_only_broadcast.remote(global_weights=ref) for w in workers])
    after = store_bytes_used()
    copies = "n/a" if before is None else f"{(after - before) / model_bytes:.2f}"
    return (f"broadcast to {len(workers)} workers on the other node: the two nodes' object "
            f"stores grew by {copies} × the model in all; read-only zero-copy views in "
            f"{sum(zero_copy)}/{len(workers)} workers")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--reducers", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--child", choices=["sharded", "unsharded"], help=argparse.SUPPRESS)
    parser.add_argument("--count", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--address", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        ray.init(address=args.address, namespace=NAMESPACE, log_to_driver=False)
        torch.set_num_threads(2)
        print(json.dumps(coordinator(arm=args.child, count=args.count, reducers=args.reducers,
                                     rounds=args.rounds)))
        return
    counts = (2, 4) if args.quick else (2, 4, 8, 16)
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 2, "include_dashboard": False, "object_store_memory": 2 << 30})
    cluster.add_node(num_cpus=2, resources={"sites": 100}, object_store_memory=4 << 30)
    ray.init(address=cluster.address, namespace=NAMESPACE)
    remote = ray.remote(SimulatedWorker)
    pool = [remote.options(name=f"scale-sim-{i:02d}", num_cpus=0.1,
                           resources={"sites": 1}).remote(seed=i)
            for i in range(max(counts))]
    ray.get([w.read_only_broadcast.remote(global_weights={}) for w in pool])  # all started
    address = ray.get_runtime_context().gcs_address
    rows, result = [], {}
    for k in counts:
        result = {arm: run_child(arm=arm, count=k, args=args, address=address)
                  for arm in ("unsharded", "sharded")}
        plain, shard = result["unsharded"], result["sharded"]
        rows.append([str(k)] + [f"{r[key]:.2f}" for r in (plain, shard)
                                for key in ("held", "private", "store", "peak")]
                    + [f"{plain['seconds']:.3f}", f"{shard['seconds']:.3f}",
                       f"{shard['seconds'] / plain['seconds']:.2f}"])
    model_bytes = result["sharded"]["model_bytes"]
    print(f"model: {model_bytes / 1e6:.0f} MB fp32; reducers: {args.reducers}; "
          f"coordinator peak memory in units of the model, global weights included")
    print(markdown(["K"] + [f"{arm} {what}" for arm in ("unsharded", "sharded")
                            for what in ("held", "round private rise",
                                         "landed in node's store", "peak")]
                   + ["unsharded merge s", "sharded merge s", "sharded / unsharded time"], rows))
    global_state = {n: p.data for n, p in build_model().named_parameters()}
    print(broadcast_check(pool, global_state, model_bytes))
    print(f"ratio: coordinator peak memory at K={counts[-1]}, sharded / unsharded = "
          f"{result['sharded']['peak']:.2f} / {result['unsharded']['peak']:.2f} = "
          f"{result['sharded']['peak'] / result['unsharded']['peak']:.2f}")


if __name__ == "__main__":
    main()
