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
import re
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
    home: Path  # the child's HOME: Ray writes its token to home/.ray/auth_token
    dashboard: str
    stdout: Path
    stderr: Path
    session_dir: str = ""

    def wait_ready(self, timeout_s: float = 90) -> Cluster:
        """Until the child reports its cluster; fails with its exit code and log if it ends
        first."""
        deadline = time.monotonic() + timeout_s
        while not self.stdout.read_text().strip():
            if self.process.poll() is not None:
                raise AssertionError(f"the cluster's process exited ({self.process.returncode})"
                                     f":\n{self.stderr.read_text()[-3000:]}")
            if time.monotonic() > deadline:
                raise AssertionError(f"no cluster within {timeout_s} s:\n"
                                     + self.stderr.read_text()[-3000:])
            time.sleep(0.2)
        self.session_dir = json.loads(self.stdout.read_text())["session_dir"]
        return self


def child_env(home: Path, **extra: str) -> dict[str, str]:
    """This environment without anything that would join or authenticate to another
    cluster: the child must start its own, with a token of its own."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")}
    return dict(env, HOME=str(home), **extra)


def launch_cluster(tmp: Path, *, dashboard_host: str,
                   extra_env: dict[str, str] | None = None, port: int | None = None) -> Cluster:
    """Start the child; Cluster.wait_ready waits for it (so two can start side by side)."""
    home = tmp / "home"
    home.mkdir()
    port = port or free_port()
    stdout, stderr = tmp / "stdout.txt", tmp / "stderr.txt"
    with open(stdout, "w") as out, open(stderr, "w") as err:
        process = subprocess.Popen(
            [sys.executable, "-c", CHILD, dashboard_host, str(port)], cwd=REPO,
            env=child_env(home, **(extra_env or {})), stdin=subprocess.PIPE, stdout=out,
            stderr=err, start_new_session=True, text=True)
    return Cluster(process, home, f"http://127.0.0.1:{port}", stdout, stderr)


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


def stop_clusters(*processes: subprocess.Popen) -> None:
    """Close each child's stdin (it then runs ray.shutdown), all at once so they stop side by
    side; kill what is left of their trees."""
    tree = []
    for process in processes:
        try:
            tree += [psutil.Process(process.pid), *psutil.Process(process.pid).children(True)]
        except psutil.NoSuchProcess:
            pass
        if process.stdin and not process.stdin.closed:
            process.stdin.close()
    for process in processes:
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)
    _, alive = psutil.wait_procs(tree, timeout=15)
    for leftover in alive:
        leftover.kill()


@pytest.fixture(scope="module")
def clusters(tmp_path_factory):
    """Two embedded clusters, started side by side: the default (dashboard on 127.0.0.1)
    and one whose dashboard is set to listen on every interface."""
    launched = {}
    try:
        for name, host in (("loopback", "127.0.0.1"), ("exposed", "0.0.0.0")):
            launched[name] = launch_cluster(tmp_path_factory.mktemp(name), dashboard_host=host)
        for cluster in launched.values():
            wait_for_dashboard(cluster.wait_ready().dashboard)
        yield launched
    finally:
        stop_clusters(*(cluster.process for cluster in launched.values()))


def test_every_port_of_the_embedded_cluster_is_on_loopback(clusters):
    listeners = tcp_listeners(clusters["loopback"])
    names = {name for name, _, _ in listeners}
    assert {"gcs_server", "raylet"} <= names, listeners  # the scan saw the cluster
    exposed = [entry for entry in listeners if not is_loopback(entry[1])]
    assert exposed == [], f"listening beyond 127.0.0.1: {exposed}"


def test_dashboard_api_needs_the_token(clusters, monkeypatch):
    cluster = clusters["loopback"]
    url = f"{cluster.dashboard}/api/version"
    assert requests.get(url, timeout=10).status_code == 401
    monkeypatch.setenv("HOME", str(cluster.home))  # read the token as Ray documents, there
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH", raising=False)
    token = ray_token()
    assert token, "the embedded cluster wrote no token to ~/.ray/auth_token"
    assert requests.get(url, headers={"Authorization": "Bearer wrong"}, timeout=10
                        ).status_code == 403
    answer = requests.get(url, headers={"Authorization": f"Bearer {token}"}, timeout=10)
    assert answer.status_code == 200 and answer.json()["ray_version"]


def test_exposed_dashboard_warns_and_nothing_else_follows_it(clusters):
    cluster = clusters["exposed"]
    port = int(cluster.dashboard.rsplit(":", 1)[1])
    listeners = tcp_listeners(cluster)
    assert [ip for _, ip, p in listeners if p == port] == ["0.0.0.0"]
    exposed = [entry for entry in listeners if not is_loopback(entry[1]) and entry[2] != port]
    assert exposed == [], f"listening beyond 127.0.0.1: {exposed}"
    log = cluster.stderr.read_text()
    assert "cluster.dashboard_host is 0.0.0.0" in log and "runs any code it is sent" in log


def test_embedded_cluster_refuses_to_start_with_token_auth_off(tmp_path):
    cluster = launch_cluster(tmp_path, dashboard_host="127.0.0.1",
                             extra_env={"RAY_AUTH_MODE": "disabled"})
    try:
        cluster.wait_ready()
    except AssertionError as failed:  # the child exited: see why
        message = str(failed)
    else:
        pytest.fail("the embedded cluster started with RAY_AUTH_MODE=disabled")
    finally:
        stop_clusters(cluster.process)
    assert "RAY_AUTH_MODE='disabled' in the environment turns Ray's token" in message
    assert "unset RAY_AUTH_MODE" in message


def test_token_mode_reaches_a_process_that_read_rays_config_before(tmp_path):
    """Ray caches its auth mode on first read; a process that read it before
    require_token_auth would otherwise start a cluster whose processes disagree with it."""
    code = ("from ray._raylet import AuthenticationMode, get_authentication_mode as mode\n"
            "assert mode() != AuthenticationMode.TOKEN  # read (and cached) while unset\n"
            "from cluster.auth import require_token_auth\n"
            "require_token_auth(who='test')\n"
            "print(mode() == AuthenticationMode.TOKEN)\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=child_env(tmp_path),
                          check=False, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "True"


def test_a_second_embedded_cluster_takes_a_free_dashboard_port_and_says_which(clusters,
                                                                             tmp_path):
    """`tributary serve RUN_DIR`, then `tributary resume RUN_DIR` on the same machine: both
    start a cluster of their own with the run's dashboard port. The second one starts."""
    taken = int(clusters["loopback"].dashboard.rsplit(":", 1)[1])
    second = launch_cluster(tmp_path, dashboard_host="127.0.0.1", port=taken)
    try:
        second.wait_ready()
        log = second.stderr.read_text()
        moved = re.search(rf"port {taken} of 127.0.0.1 is in use .* this cluster's dashboard "
                          r"is at http://127.0.0.1:(\d+) instead", log)
        assert moved, log[-3000:]
        wait_for_dashboard(f"http://127.0.0.1:{moved.group(1)}")
    finally:
        stop_clusters(second.process)
