"""The embedded Ray cluster (cluster.connect.connect) is reachable from this machine only and
only with Ray's token: every TCP port its processes listen on is bound to 127.0.0.1 (the
dashboard to cluster.dashboard_host, with a warning when that is not loopback), and the
dashboard's API answers 401 without the token, 200 with it.

Each cluster starts in a fresh Python (this test session may hold its own Ray cluster) with
HOME in a temporary folder, so Ray generates a fresh token there."""

from __future__ import annotations

import ipaddress
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
import requests

from cluster.auth import ray_token
from tests.helpers import free_port

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]

# Runs in the child: start the embedded cluster, run a task (so a worker process listens
# too), report, and shut down when the test closes stdin.
CHILD = """
import json, logging, sys
import ray
from cluster.connect import connect
logging.basicConfig(level=logging.INFO)
assert connect(num_cpus=1, dashboard_host=sys.argv[1], dashboard_port=int(sys.argv[2]))
assert ray.get(ray.remote(lambda: 1).remote()) == 1
session = ray._private.worker.global_worker.node.get_session_dir_path()
print(json.dumps({"session_dir": session}), flush=True)
sys.stdin.read()
ray.shutdown()
"""


@dataclass
class Cluster:
    process: subprocess.Popen
    home: Path
    dashboard: str
    session_dir: str
    stderr: Path


def child_env(home: Path, **extra: str) -> dict[str, str]:
    """This environment without anything that would join or authenticate to another
    cluster: the child must start its own, with a token of its own."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")}
    return dict(env, HOME=str(home), **extra)


def start_cluster(tmp: Path, *, dashboard_host: str, extra_env: dict[str, str] | None = None,
                  timeout_s: float = 60) -> Cluster:
    home = tmp / "home"
    home.mkdir()
    port = free_port()
    stdout, stderr = tmp / "stdout.txt", tmp / "stderr.txt"
    with open(stdout, "w") as out, open(stderr, "w") as err:
        process = subprocess.Popen([sys.executable, "-c", CHILD, dashboard_host, str(port)],
                                   cwd=REPO, env=child_env(home, **(extra_env or {})), stdin=subprocess.PIPE,
                                   stdout=out, stderr=err, start_new_session=True, text=True)
    deadline = time.monotonic() + timeout_s
    while not stdout.read_text().strip():
        if process.poll() is not None:
            raise AssertionError(f"the cluster's process exited ({process.returncode}):\n"
                                 + stderr.read_text()[-3000:])
        if time.monotonic() > deadline:
            stop_cluster(process)
            raise AssertionError(f"no cluster within {timeout_s} s:\n{stderr.read_text()[-3000:]}")
        time.sleep(0.2)
    session = json.loads(stdout.read_text())["session_dir"]
    return Cluster(process, home, f"http://127.0.0.1:{port}", session, stderr)


def cluster_processes(cluster: Cluster) -> list[psutil.Process]:
    """The driver, everything it started, and any process that names the cluster's session
    folder (in case one was re-parented)."""
    driver = psutil.Process(cluster.process.pid)
    found = {p.pid: p for p in [driver, *driver.children(recursive=True)]}
    for process in psutil.process_iter(["cmdline"]):
        if cluster.session_dir in " ".join(process.info["cmdline"] or []):
            found.setdefault(process.pid, process)
    return list(found.values())


def tcp_listeners(cluster: Cluster) -> list[tuple[str, str, int]]:
    """(process name, address, port) of every listening TCP socket of the cluster."""
    listening = []
    for process in cluster_processes(cluster):
        try:
            sockets = process.net_connections(kind="tcp")
            name = process.name()
        except psutil.NoSuchProcess:
            continue
        listening += [(name, c.laddr.ip, c.laddr.port) for c in sockets
                      if c.status == psutil.CONN_LISTEN]
    return listening


def is_loopback(ip: str) -> bool:
    address = ipaddress.ip_address(ip)
    mapped = getattr(address, "ipv4_mapped", None)  # ::ffff:127.0.0.1 on dual-stack sockets
    return address.is_loopback or (mapped is not None and mapped.is_loopback)


def wait_for_dashboard(url: str, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            requests.get(f"{url}/api/version", timeout=5)
            return
        except requests.ConnectionError:
            assert time.monotonic() < deadline, f"the dashboard at {url} never answered"
            time.sleep(0.5)


def stop_cluster(process: subprocess.Popen) -> None:
    """Close stdin (the child then runs ray.shutdown); kill what is left of its tree."""
    try:
        tree = [psutil.Process(process.pid), *psutil.Process(process.pid).children(True)]
    except psutil.NoSuchProcess:
        tree = []
    if process.stdin and not process.stdin.closed:
        process.stdin.close()
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)
    _, alive = psutil.wait_procs(tree, timeout=15)
    for leftover in alive:
        leftover.kill()


@pytest.fixture(scope="module")
def loopback_cluster(tmp_path_factory):
    cluster = start_cluster(tmp_path_factory.mktemp("loopback"), dashboard_host="127.0.0.1")
    try:
        wait_for_dashboard(cluster.dashboard)
        yield cluster
    finally:
        stop_cluster(cluster.process)


def test_every_port_of_the_embedded_cluster_is_on_loopback(loopback_cluster):
    listeners = tcp_listeners(loopback_cluster)
    names = {name for name, _, _ in listeners}
    assert {"gcs_server", "raylet"} <= names, listeners  # the scan saw the cluster
    exposed = [entry for entry in listeners if not is_loopback(entry[1])]
    assert exposed == [], f"listening beyond 127.0.0.1: {exposed}"


def test_dashboard_api_needs_the_token(loopback_cluster, monkeypatch):
    monkeypatch.setenv("HOME", str(loopback_cluster.home))  # where the child's Ray wrote it
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH", raising=False)
    url = f"{loopback_cluster.dashboard}/api/version"
    assert requests.get(url, timeout=10).status_code == 401
    token = ray_token()
    assert token, "the embedded cluster wrote no token to ~/.ray/auth_token"
    assert requests.get(url, headers={"Authorization": "Bearer wrong"}, timeout=10
                        ).status_code == 403
    answer = requests.get(url, headers={"Authorization": f"Bearer {token}"}, timeout=10)
    assert answer.status_code == 200 and answer.json()["ray_version"]


def test_exposed_dashboard_warns_and_nothing_else_follows_it(tmp_path):
    cluster = start_cluster(tmp_path, dashboard_host="0.0.0.0")
    try:
        wait_for_dashboard(cluster.dashboard)
        port = int(cluster.dashboard.rsplit(":", 1)[1])
        listeners = tcp_listeners(cluster)
    finally:
        stop_cluster(cluster.process)
    assert [ip for _, ip, p in listeners if p == port] == ["0.0.0.0"]
    exposed = [entry for entry in listeners if not is_loopback(entry[1]) and entry[2] != port]
    assert exposed == [], f"listening beyond 127.0.0.1: {exposed}"
    log = cluster.stderr.read_text()
    assert "cluster.dashboard_host is 0.0.0.0" in log and "runs any code it is sent" in log


def test_embedded_cluster_refuses_to_start_with_token_auth_off(tmp_path):
    try:
        cluster = start_cluster(tmp_path, dashboard_host="127.0.0.1",
                                extra_env={"RAY_AUTH_MODE": "disabled"})
    except AssertionError as failed:  # the child exited: see why
        message = str(failed)
    else:
        stop_cluster(cluster.process)
        pytest.fail("the embedded cluster started with RAY_AUTH_MODE=disabled")
    assert "RAY_AUTH_MODE='disabled' in the environment turns Ray's token" in message
    assert "unset RAY_AUTH_MODE" in message
