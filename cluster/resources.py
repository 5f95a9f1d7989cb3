"""Ray options for worker actors: resources, placement, names and environment."""

from __future__ import annotations

import ray

from cluster.connect import NAMESPACE


def worker_name(site: str, *, rank: int = 0) -> str:
    """Rank 0 (a site's only worker, or its group's first) keeps the plain name."""
    return f"tributary-worker-{site}" + (f"-rank{rank}" if rank else "")


def worker_options(*, site: str, num_cpus: float, num_gpus: float,
                   resources: dict[str, float] | None = None, rank: int = 0,
                   malloc_mmap_threshold: int | None = None) -> dict:
    """Options for `ray.remote(Worker).options(...)`: one named actor per site, spread
    across nodes (or pinned by a custom resource only its node has); CPU-only workers run
    DeepSpeed's CPU accelerator."""
    env = {"TOKENIZERS_PARALLELISM": "false"}
    if num_gpus == 0:
        env["DS_ACCELERATOR"] = "cpu"
    if malloc_mmap_threshold is not None:  # glibc reads it once, when the process starts
        env["MALLOC_MMAP_THRESHOLD_"] = str(malloc_mmap_threshold)
    return {
        "name": worker_name(site, rank=rank),
        "namespace": NAMESPACE,
        "num_cpus": num_cpus,
        "num_gpus": num_gpus,
        "scheduling_strategy": "SPREAD",
        "runtime_env": {"env_vars": env},
        "max_concurrency": 1,
        "resources": dict(resources or {}),
    }


def current_node() -> str | None:
    """The Ray node id of this process (None outside Ray): where a worker actually runs."""
    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None


@ray.remote(num_cpus=0)
def group_rendezvous() -> tuple[str, int]:
    """Run on a group's first bundle: its node's address and a free port there."""
    import socket

    with socket.socket() as sock:
        sock.bind(("", 0))
        port = sock.getsockname()[1]
    return ray.util.get_node_ip_address(), port
