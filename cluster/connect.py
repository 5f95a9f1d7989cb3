"""Connecting to Ray: an embedded local cluster by default, or an existing one.

An address (config `cluster.address`, else the RAY_ADDRESS environment variable) joins
that cluster. Otherwise a local cluster starts in-process that only this machine can reach:
Ray's token authentication on (RAY_AUTH_MODE=token; the token is in ~/.ray/auth_token unless
RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH say otherwise) and every port it opens (GCS, raylet,
object manager, workers, agents, metrics) bound to 127.0.0.1; only the dashboard follows
`cluster.dashboard_host`.
"""

from __future__ import annotations

import ipaddress
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager

import ray

from cluster.auth import require_token_auth

NAMESPACE = "tributary"
# Ray's switch for single-machine clusters (its default on macOS and Windows): the node's
# address becomes 127.0.0.1, so every listener binds loopback and no other node can join.
LOOPBACK_SWITCH = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
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
    require_token_auth(who="the embedded Ray cluster")
    if include_dashboard:
        dashboard_port = free_dashboard_port(dashboard_host, dashboard_port)
        warn_if_exposed(dashboard_host, port=dashboard_port)
    with loopback_only():
        # "local": a new cluster even where `ray start` left an address in
        # /tmp/ray/ray_current_cluster (a bare ray.init() would join that one).
        context = ray.init(address="local", namespace=NAMESPACE, num_cpus=num_cpus,
                           include_dashboard=include_dashboard, dashboard_host=dashboard_host,
                           dashboard_port=dashboard_port)
    if include_dashboard and context.dashboard_url:
        log.info("Ray dashboard: http://%s", context.dashboard_url)
    return True


def free_dashboard_port(host: str, port: int) -> int:
    """`port`, or a free one where another embedded cluster on this machine holds it (a
    `tributary serve` of the run this process is about to train: both start a cluster of
    their own, and Ray would fail to bind the dashboard's port)."""
    import socket

    with socket.socket() as probe:
        try:
            probe.bind((host, port))
            return port
        except OSError:
            pass
    with socket.socket() as probe:
        probe.bind((host, 0))
        free = probe.getsockname()[1]
    log.warning("port %d of %s is in use (another Ray cluster on this machine, e.g. `tributary "
                "serve`?): this cluster's dashboard is at http://%s:%d instead", port, host,
                host, free)
    return free


@contextmanager
def loopback_only() -> Iterator[None]:
    """Inside this block, a Ray cluster started by this process binds 127.0.0.1 only.

    Ray has no bind-address option for its own ports: it binds the node's address, which is
    127.0.0.1 only where multi-node clusters are switched off. The processes ray.init starts
    inherit the variable; this process read it when it imported Ray, so the module flag is
    set too. Both are put back afterwards, so that a `ray start --address` this process runs
    later can still join a real cluster (the switch makes it refuse)."""
    from ray._private import ray_constants

    saved_env, saved_flag = os.environ.get(LOOPBACK_SWITCH), ray_constants.ENABLE_RAY_CLUSTER
    os.environ[LOOPBACK_SWITCH] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved_flag
        if saved_env is None:
            os.environ.pop(LOOPBACK_SWITCH, None)
        else:
            os.environ[LOOPBACK_SWITCH] = saved_env


def warn_if_exposed(host: str, *, port: int) -> None:
    if is_loopback(host):
        return
    log.warning(
        "cluster.dashboard_host is %s: the Ray dashboard of this run listens on port %d beyond "
        "this machine, and its job API runs any code it is sent. Token authentication is on, "
        "so only holders of the token (~/.ray/auth_token) get in, but keep that port behind a "
        "firewall or an authenticating proxy, or set cluster.dashboard_host to 127.0.0.1 and "
        "reach it through an SSH tunnel (ssh -L %d:127.0.0.1:%d HOST). Ray's other ports "
        "stay on 127.0.0.1.", host, port, port, port)


def is_loopback(host: str) -> bool:
    """True for localhost and loopback addresses (IPv4-mapped ones too); a host name other
    than localhost may resolve to anything, so it counts as exposed."""
    if host == "localhost":
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    mapped = getattr(address, "ipv4_mapped", None)
    return address.is_loopback or (mapped is not None and mapped.is_loopback)
