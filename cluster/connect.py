"""Connecting to Ray: an embedded local cluster by default, or an existing one.

An address (config `cluster.address`, else the RAY_ADDRESS environment variable) joins
that cluster. Otherwise a local cluster starts in-process with the dashboard bound to
127.0.0.1 and Ray's token authentication left on (the token is in ~/.ray/auth_token).
"""

from __future__ import annotations

import logging
import os

import ray

NAMESPACE = "tributary"
log = logging.getLogger(__name__)


def connect(*, address: str | None = None, num_cpus: int | None = None,
            dashboard_host: str = "127.0.0.1", dashboard_port: int = 8265,
            include_dashboard: bool = True) -> bool:
    """Connect this process to Ray; returns True if it started a cluster it must shut down."""
    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, namespace=NAMESPACE, log_to_driver=True)
        log.info("joined Ray cluster at %s", address)
        return True
    context = ray.init(namespace=NAMESPACE, num_cpus=num_cpus,
                       include_dashboard=include_dashboard, dashboard_host=dashboard_host,
                       dashboard_port=dashboard_port)
    if include_dashboard and context.dashboard_url:
        log.info("Ray dashboard: http://%s", context.dashboard_url)
    return True

