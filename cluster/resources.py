"""Ray options for worker actors: resources, placement, names and environment."""

from __future__ import annotations

from cluster.connect import NAMESPACE


def worker_name(site: str) -> str:
    return f"tributary-worker-{site}"


def worker_options(*, site: str, num_cpus: float, num_gpus: float,
                   resources: dict[str, float] | None = None) -> dict:
    """Options for `ray.remote(Worker).options(...)`: one named actor per site, spread
    across nodes (or pinned by a custom resource only its node has); CPU-only workers run
    DeepSpeed's CPU accelerator."""
    env = {"TOKENIZERS_PARALLELISM": "false"}
    if num_gpus == 0:
        env["DS_ACCELERATOR"] = "cpu"
    return {
        "name": worker_name(site),
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
    import ray

    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
