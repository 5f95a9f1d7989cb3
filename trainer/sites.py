"""The actors serving one site: a single Worker, or a data-parallel group of them.

With `sites[].num_workers: N > 1` the site is N Worker actors forming one DeepSpeed process
group (gloo on CPU, NCCL on GPU; the ZeRO stage comes from the DeepSpeed config). A placement
group of N bundles (PACK: one node if it fits) holds them; rank 0's node address is the
group's rendezvous. Every rank trains each batch's share of rows on identical weights, and
rank 0 answers for the site: one update per site whatever N is.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from cluster.connect import NAMESPACE
from cluster.resources import group_rendezvous, worker_name, worker_options
from workers.types import GroupSpec
from workers.worker import ACTOR_OPTIONS

log = logging.getLogger(__name__)


class SiteWorkers:
    def __init__(self, site: str, actors: list, group=None) -> None:
        self.site = site
        self.actors = actors
        self.group = group  # the placement group of a multi-worker site

    @property
    def names(self) -> list[str]:
        """The actors' names, rank 0 first (how operators and the state API find them)."""
        return [worker_name(self.site, rank=rank) for rank in range(len(self.actors))]

    @property
    def primary(self):
        """Rank 0: the actor whose answer is the site's update."""
        return self.actors[0]

    def call(self, method: str, **kwargs) -> list:
        """Start `method` on every rank; returns their refs, rank 0 first."""
        return [getattr(actor, method).remote(**kwargs) for actor in self.actors]

    def chain(self, method: str, *, after: list, **kwargs) -> list:
        """Start `method` on every rank once that rank's ref in `after` is ready (Ray
        resolves an argument ref before the call runs, and fails the call if it failed)."""
        return [getattr(actor, method).remote(ref, **kwargs)
                for actor, ref in zip(self.actors, after, strict=True)]

    def kill(self) -> None:
        for actor in self.actors:
            ray.kill(actor, no_restart=True)
        if self.group is not None:
            remove_placement_group(self.group)


def start_site(*, worker_cls: type, site: str, size: int, num_cpus: float, num_gpus: float,
               resources: dict[str, float], make_kwargs: Callable[[GroupSpec | None], dict],
               ready_timeout_s: float = 600.0,
               malloc_mmap_threshold: int | None = None) -> SiteWorkers:
    """Create the site's actor(s). `make_kwargs(group)` gives a Worker's constructor
    arguments for its place in the group (None for a single worker)."""
    remote = ray.remote(**ACTOR_OPTIONS)(worker_cls)
    if size == 1:
        options = worker_options(site=site, num_cpus=num_cpus, num_gpus=num_gpus,
                                 resources=resources, malloc_mmap_threshold=malloc_mmap_threshold)
        wait_for_name(options["name"])
        return SiteWorkers(site, [remote.options(**options).remote(**make_kwargs(None))])
    bundle = {"CPU": num_cpus, **({"GPU": num_gpus} if num_gpus else {}), **resources}
    group = placement_group([dict(bundle) for _ in range(size)], strategy="PACK",
                            name=f"tributary-site-{site}")
    try:
        try:
            ray.get(group.ready(), timeout=ready_timeout_s)
        except ray.exceptions.GetTimeoutError:
            raise RuntimeError(
                f"its placement group of {size} × {bundle} was not ready within "
                f"{ready_timeout_s:g} s; the cluster has {ray.available_resources()} free. "
                "Free resources, lower worker.num_cpus / num_gpus or num_workers, or add "
                "nodes") from None
        address, port = ray.get(group_rendezvous.options(
            scheduling_strategy=PlacementGroupSchedulingStrategy(
                group, placement_group_bundle_index=0)).remote())
    except Exception:
        remove_placement_group(group)
        raise
    actors = []
    for rank in range(size):
        options = worker_options(site=site, num_cpus=num_cpus, num_gpus=num_gpus,
                                 resources=resources, rank=rank,
                                 malloc_mmap_threshold=malloc_mmap_threshold)
        options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
            group, placement_group_bundle_index=rank)
        wait_for_name(options["name"])
        spec = GroupSpec(rank=rank, size=size, master_addr=address, master_port=port)
        actors.append(remote.options(**options).remote(**make_kwargs(spec)))
    log.info("site %s: %d workers in one DeepSpeed group, rendezvous %s:%d", site, size,
             address, port)
    return SiteWorkers(site, actors, group)


def wait_for_name(name: str, timeout_s: float = 60.0) -> None:
    """A worker of a run that just died keeps its name until Ray has cleaned it up."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            ray.get_actor(name, namespace=NAMESPACE)
        except ValueError:
            return
        time.sleep(0.5)
    raise RuntimeError(f"a live actor named {name!r} exists in namespace {NAMESPACE!r}: is "
                       "another run using these sites? Stop it, or `ray.kill` that actor.")


def all_names(site: str, size: int) -> list[str]:
    return [worker_name(site, rank=rank) for rank in range(size)]
