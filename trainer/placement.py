"""Can a site's workers be placed? Asked before a run waits on them, so a site that asks for
more than the cluster has is reported within seconds, with what it asks for and what the
cluster holds, instead of a round deadline later."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping

import ray

log = logging.getLogger(__name__)


def worker_demand(*, num_cpus: float, num_gpus: float, resources: Mapping[str, float]
                  ) -> dict[str, float]:
    """What one worker actor of a site asks Ray for."""
    demand = {"CPU": num_cpus, **({"GPU": num_gpus} if num_gpus else {}), **resources}
    return {k: v for k, v in demand.items() if v}


def infeasible(demand: Mapping[str, float]) -> str | None:
    """Why no node of the cluster could ever hold one worker (None: some node could)."""
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    if any(all(node.get(k, 0) >= v for k, v in demand.items()) for node in nodes):
        return None
    shown = [_short(node) for node in nodes]
    return (f"it asks for {_short(demand)} per worker and no node has that (nodes: {shown}); "
            "lower worker.num_cpus / num_gpus, drop sites[].resources, or add such a node")


def wait_until_placed(names: Mapping[str, list[str]], *, timeout_s: float
                      ) -> dict[str, bool]:
    """{site: placed?} once every site's actors (by name) have a process, or at the deadline.
    Without Ray's state API (no dashboard) nothing can be told: every site counts as placed."""
    from ray.util.state import list_actors

    placed: dict[str, bool] = {site: False for site in names}
    # This run's cluster, named: left to itself the state API looks for one on the machine.
    address = ray.get_runtime_context().gcs_address
    deadline = time.monotonic() + timeout_s
    while True:
        for site in [s for s, done in placed.items() if not done]:
            try:
                # Dead actors of earlier runs keep their names (and pids) in the listing.
                states = [list_actors(address=address, detail=True,
                                      filters=[("name", "=", n), ("state", "!=", "DEAD")])
                          for n in names[site]]
            except Exception as exc:  # noqa: BLE001 - no state API here: cannot tell, do not block
                log.info("cannot see actor placement (%s); not checking it", exc)
                return {site: True for site in names}
            # A process id means the actor has a node and its constructor is running or done.
            placed[site] = all(any(a.state == "ALIVE" or a.pid for a in found)
                               for found in states)
        if all(placed.values()) or time.monotonic() >= deadline:
            return placed
        time.sleep(1.0)


def waiting_reason(demand: Mapping[str, float], *, workers: int, timeout_s: float) -> str:
    return (f"its {workers} worker(s) were not placed within cluster.placement_timeout_s="
            f"{timeout_s:g} s: each asks for {_short(demand)}; the cluster has "
            f"{_short(ray.available_resources())} free of {_short(ray.cluster_resources())}. "
            "Free resources, lower worker.num_cpus / num_gpus, or add nodes")


def _short(resources: Mapping[str, float]) -> dict[str, float]:
    """Resources as users name them (Ray's bookkeeping entries left out)."""
    return {k: round(v, 3) for k, v in sorted(resources.items())
            if not k.startswith(("node:", "memory", "object_store_memory", "accelerator_type"))}
