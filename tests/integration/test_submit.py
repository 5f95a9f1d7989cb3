"""`tributary submit` against a real two-node Ray cluster started with the `ray` CLI on this
machine: a head node and a second node joined with `ray start --address`, each with its own
custom resource, token authentication on. The job's two workers are pinned one per node."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from cluster.auth import auth_headers
from tests.helpers import free_ports, tiny_config
from trainer.checkpoint import all_manifests
from trainer.cli import main as cli
from trainer.metrics import read_metrics

pytestmark = pytest.mark.integration
RAY = str(Path(sys.executable).with_name("ray"))


@dataclass
class Node:
    process: subprocess.Popen
    log: Path  # `ray start`'s stdout and stderr: a file, so a chatty node never blocks

    def check_running(self) -> None:
        """Fail with `ray start`'s exit code and its own words if the node has stopped."""
        if self.process.poll() is not None:
            raise AssertionError(f"`ray start` exited with {self.process.returncode}:\n"
                                 + self.log.read_text()[-3000:])


def start_node(args: list[str], env: dict, log: Path) -> Node:
    """`ray start --block` in its own process group, so the test can stop exactly this node
    (and not the other Ray clusters on the machine, as `ray stop` would)."""
    ports = ["--dashboard-agent-listen-port", "--dashboard-agent-grpc-port",
             "--metrics-export-port", "--runtime-env-agent-port"]
    port_args = [a for p, n in zip(ports, free_ports(len(ports))) for a in (p, str(n))]
    with open(log, "w") as out:
        process = subprocess.Popen([RAY, "start", "--block", "--num-cpus", "2",
                                    "--object-store-memory", str(300 * 2**20), *port_args,
                                    *args], env=env, start_new_session=True, stdout=out,
                                   stderr=subprocess.STDOUT)
    return Node(process, log)


def stop_node(node: Node) -> None:
    for sig, grace in ((signal.SIGTERM, 20), (signal.SIGKILL, 5)):
        try:
            os.killpg(node.process.pid, sig)
        except ProcessLookupError:
            return
        try:
            node.process.wait(timeout=grace)
            return
        except subprocess.TimeoutExpired:
            continue


def wait_for_nodes(dashboard: str, nodes: list[Node], timeout_s: float = 120) -> None:
    """Until as many nodes as started are alive; at once if a `ray start` has failed."""
    from ray.job_submission import JobSubmissionClient

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for node in nodes:
            node.check_running()
        try:
            client = JobSubmissionClient(dashboard, headers=auth_headers())
            summary = client._do_request("GET", "/nodes?view=summary").json()
        except Exception:  # noqa: BLE001 - the head is still starting
            time.sleep(2)
            continue
        alive = [n for n in summary["data"]["summary"] if n["raylet"]["state"] == "ALIVE"]
        if len(alive) >= len(nodes):
            return
        time.sleep(2)
    raise TimeoutError(f"{len(nodes)} Ray nodes did not come up at {dashboard}")


CURRENT_CLUSTER = Path("/tmp/ray/ray_current_cluster")  # where `ray start --head` records itself


@pytest.fixture(scope="module")
def two_node_cluster(tmp_path_factory):
    env = dict(os.environ, RAY_AUTH_MODE="token",
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    gcs, dashboard = free_ports(2)
    previous = CURRENT_CLUSTER.read_text() if CURRENT_CLUSTER.is_file() else None
    logs = tmp_path_factory.mktemp("ray-start-logs")
    head = start_node(["--head", "--port", str(gcs), "--node-ip-address", "127.0.0.1",
                       "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard),
                       "--resources", '{"site_a": 1}'], env, logs / "head.txt")
    second = None
    try:
        url = f"http://127.0.0.1:{dashboard}"
        wait_for_nodes(url, [head])
        # Its own temp dir: two nodes on one machine must not share runtime-env folders (one
        # node would delete the job's working_dir that the other still runs in).
        second = start_node(["--address", f"127.0.0.1:{gcs}", "--node-ip-address", "127.0.0.1",
                             "--resources", '{"site_b": 1}',
                             "--temp-dir", str(tmp_path_factory.mktemp("ray-node-b"))], env,
                            logs / "second.txt")
        wait_for_nodes(url, [head, second])
        yield url
    finally:
        for node in (second, head):
            if node is not None:
                stop_node(node)
        # `ray stop` would reset this; a stale entry makes a later ray.init() try to join.
        if previous is not None:
            CURRENT_CLUSTER.write_text(previous)
        else:
            CURRENT_CLUSTER.unlink(missing_ok=True)


def test_submitted_run_spreads_over_two_nodes(two_node_cluster, demo_root, notes_site, tmp_path,
                                              capsys):
    from ray.job_submission import JobSubmissionClient

    run_dir = tmp_path / "shared" / "run"  # a local folder stands for shared storage
    config = tiny_config(demo_root, notes_site, run_dir)
    raw = config.to_dict()
    raw["sites"][0]["resources"] = {"site_a": 1}
    raw["sites"][1]["resources"] = {"site_b": 1}
    raw["cluster"]["include_dashboard"] = False
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(raw))

    assert cli(["submit", str(path), "--address", two_node_cluster, "--set", "rounds=2"]) == 0
    printed = capsys.readouterr().out
    job_id = printed.split("submitted job ")[1].split()[0]
    assert f"ray job logs --address {two_node_cluster} --follow {job_id}" in printed
    sent = re.findall(r"^\s+(\S+)\s+\d+ files\s+[\d,]+ bytes$", printed, re.MULTILINE)
    assert sorted(sent) == sorted(["trainer/", "workers/", "cluster/", "configs/",
                                   "pyproject.toml", "setup.py", "Makefile", "README.md"])

    client = JobSubmissionClient(two_node_cluster, headers=auth_headers())
    deadline = time.monotonic() + 600
    while (status := client.get_job_status(job_id).value) not in ("SUCCEEDED", "FAILED",
                                                                  "STOPPED"):
        assert time.monotonic() < deadline, "the job did not end in 10 minutes"
        time.sleep(3)
    logs = client.get_job_logs(job_id)
    assert status == "SUCCEEDED", logs[-3000:]
    # The job imports `trainer` from its uploaded sources, which hold no build output; the
    # merge's compiled sum still comes from where Tributary is installed.
    assert "merges use torch's block path" not in logs, logs[-3000:]

    assert [m["round"] for m in all_manifests(run_dir)] == [0, 1, 2]
    records = read_metrics(run_dir)
    nodes = records[-1]["nodes"]
    assert set(nodes) == {"speeches", "notes"} and None not in nodes.values()
    assert nodes["speeches"] != nodes["notes"], "both workers ran on one node"


def test_submit_refuses_paths_the_cluster_cannot_share(demo_root, notes_site, tmp_path, capsys):
    config = tiny_config(demo_root, notes_site, tmp_path / "run").to_dict()
    config["run"]["dir"] = "runs/relative"
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    assert cli(["submit", str(path), "--address", "http://127.0.0.1:1"]) == 2
    error = capsys.readouterr().err
    assert "run.dir: 'runs/relative' is relative" in error and "--set" in error
