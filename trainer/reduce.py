"""Sharded reduction: each reducer actor combines one slice of the tensors of every delta.

With `merge.reducers: N`, workers return their delta cut into N slices, each a separate
object in the Ray object store on the worker's node. Reducer i reads slice i of every update
where it lies, reports what validation needs (finite, layout, Σ x²), then combines the
accepted slices with the strategy's rule. The coordinator only ever holds the global model and
one combined slice at a time, so its memory does not grow with the number of workers.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, MutableMapping, Sequence

import numpy as np
import ray
import torch
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from trainer.strategies import FedAvg, MergeConfig
from trainer.validate import DeltaStats, delta_stats
from workers.compression import unpack_delta
from workers.partitions import assemble


def plan_shards(shapes: Mapping[str, tuple[int, ...]], count: int) -> list[list[str]]:
    """Tensor names split into `count` slices of near-equal size (largest tensor first into
    the lightest slice); each slice keeps the model's tensor order. Never an empty slice."""
    count = max(1, min(count, len(shapes)))
    sizes = [0] * count
    owner: dict[str, int] = {}
    for name in sorted(shapes, key=lambda n: -int(np.prod(shapes[n]))):
        lightest = sizes.index(min(sizes))
        owner[name] = lightest
        sizes[lightest] += int(np.prod(shapes[name]))
    return [[name for name in shapes if owner[name] == index] for index in range(count)]


# One site's slice i: (payload, layout) from a one-worker site, or for a group the refs of
# every rank's (payload, layout), each rank holding the ZeRO slices of the tensors it owns.
Part = tuple | list


def whole_slice(part: Part) -> dict[str, np.ndarray]:
    """A site's slice of the delta in fp32, put together from its ranks' pieces."""
    pieces = [p for p in ray.get(part) if p is not None] if isinstance(part, list) else [part]
    return assemble((unpack_delta(payload), layout) for payload, layout in pieces)


class ShardReducer:
    """A plain class the coordinator runs as an actor: one slice of every round's deltas."""

    def __init__(self, *, shapes: Mapping[str, tuple[int, ...]], merge: MergeConfig) -> None:
        self.shapes = dict(shapes)
        self.strategy = merge.build()  # only its combine rule runs here
        # The combined slice, reused every round (no fresh pages to fault in).
        self.out = {k: torch.zeros(s, dtype=torch.float32) for k, s in self.shapes.items()}

    def inspect(self, *parts: Part) -> list[DeltaStats]:
        """Validation facts of this slice of each update, in order."""
        return [delta_stats(whole_slice(p), self.shapes) for p in parts]

    def combine(self, weights: Sequence[float], *parts: Part) -> dict[str, np.ndarray]:
        """The strategy's combination (weighted average, trimmed mean, median) of this slice."""
        with warnings.catch_warnings():  # object-store arrays are read-only; we only read them
            warnings.simplefilter("ignore", UserWarning)
            updates = [({k: torch.from_numpy(v) for k, v in whole_slice(p).items()}, w)
                       for p, w in zip(parts, weights, strict=True)]
        combined = self.strategy.combine(updates, out=self.out)
        return {k: v.numpy() for k, v in combined.items()}


def placement(index: int):
    """Where reducer `index` runs: round-robin over the cluster's other nodes (preferred, not
    required), so the slices it reads are not pulled into the coordinator's node's object
    store; on a one-node cluster, that node."""
    here = ray.get_runtime_context().get_node_id()
    others = sorted(n["NodeID"] for n in ray.nodes() if n["Alive"] and n["NodeID"] != here)
    if not others:
        return "SPREAD"
    return NodeAffinitySchedulingStrategy(node_id=others[index % len(others)], soft=True)


class ShardedMerge:
    """The coordinator's side: reducer actors started once per run, asked twice per round."""

    def __init__(self, *, shapes: Mapping[str, tuple[int, ...]], count: int,
                 merge: MergeConfig) -> None:
        self.shards = plan_shards(shapes, count)
        remote = ray.remote(ShardReducer)
        self.reducers = [remote.options(num_cpus=0, scheduling_strategy=placement(index))
                         .remote(shapes={n: shapes[n] for n in names}, merge=merge)
                         for index, names in enumerate(self.shards)]

    def stats(self, parts: Mapping[str, Sequence]) -> dict[str, DeltaStats]:
        """{site: DeltaStats} over all slices: the first problem found, the summed Σ x²."""
        sites = list(parts)
        answers = ray.get([reducer.inspect.remote(*[parts[s][i] for s in sites])
                           for i, reducer in enumerate(self.reducers)])
        result = {}
        for index, site in enumerate(sites):
            slices = [answer[index] for answer in answers]
            problem = next((s.problem for s in slices if s.problem), None)
            result[site] = DeltaStats(problem, sum(s.sum_squares for s in slices))
        return result

    def apply(self, strategy: FedAvg, global_state: MutableMapping[str, torch.Tensor],
              parts: Mapping[str, Sequence], weights: Mapping[str, float], *,
              scale: float = 1.0) -> None:
        """Combine every slice on its reducer and take the strategy's outer step slice by
        slice, as each arrives: the coordinator holds one combined slice at a time.
        `scale` shrinks each combined slice first (as FedAvg.aggregate)."""
        if not parts:  # nothing to merge: keep the previous global
            return
        sites = list(parts)
        pending = {reducer.combine.remote([weights[s] for s in sites],
                                          *[parts[s][i] for s in sites]): i
                   for i, reducer in enumerate(self.reducers)}
        while pending:
            [ready], _ = ray.wait(list(pending), num_returns=1)
            names = self.shards[pending.pop(ready)]
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                combined = {k: torch.from_numpy(v) for k, v in ray.get(ready).items()}
            if scale != 1.0:  # the object store's arrays are read-only: scaled copies
                combined = {k: v * scale for k, v in combined.items()}
            strategy.step({n: global_state[n] for n in names}, combined)
            del combined

    def shutdown(self) -> None:
        for reducer in self.reducers:
            ray.kill(reducer, no_restart=True)
