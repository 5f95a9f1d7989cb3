"""Ray fixtures for the integration and chaos suites: one real local Ray cluster per session
(dashboard and metrics on 127.0.0.1, token auth on) and a JSONL site of real text."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest
import ray
import requests

from cluster.connect import NAMESPACE
from tests.helpers import free_ports, tiny_config
from trainer.coordinator import run_training


@pytest.fixture(scope="session")
def ray_cluster():
    metrics_port, dashboard_port = free_ports(2)
    # "local": a cluster of its own, even while a `ray start` cluster runs on this machine.
    ray.init(address="local", namespace=NAMESPACE, num_cpus=2, include_dashboard=True,
             dashboard_host="127.0.0.1", dashboard_port=dashboard_port,
             _metrics_export_port=metrics_port,
             # Export metrics every second (Ray's default is 10 s): a short test run is over
             # before a first 10 s export, and the tests check what is served while it runs.
             _system_config={"metrics_report_interval_ms": 1000})
    yield {"metrics_port": metrics_port}
    ray.shutdown()


@pytest.fixture(scope="session")
def notes_site(demo_root) -> Path:
    """A JSONL site whose text column is called `body`: real speech paragraphs, 3 files."""
    import pyarrow.parquet as pq

    rows = pq.read_table(demo_root / "data" / "demo" / "speeches" / "1800s.parquet")
    texts = [t for t in rows.column("text").to_pylist() if 200 < len(t) < 900][:24]
    folder = demo_root / "notes"
    folder.mkdir()
    for index in range(3):
        with open(folder / f"part-{index}.jsonl", "w") as handle:
            chunk = texts[index * 8:(index + 1) * 8]
            handle.writelines(json.dumps({"body": text, "id": index}) + "\n" for text in chunk)
    return folder


# Every metric a plain run exports (RayMetrics); the failure and quarantine counters are
# served once something fails, and are checked by the chaos tests that make that happen.
EXPECTED_METRICS = {"ray_tributary_round", "ray_tributary_version",
                    "ray_tributary_eval_perplexity", "ray_tributary_tokens_total",
                    "ray_tributary_train_loss", "ray_tributary_tokens_per_second",
                    "ray_tributary_merge_seconds", "ray_tributary_forgetting",
                    "ray_tributary_backward_transfer", "ray_tributary_newest_gain",
                    "ray_tributary_learning_rate", "ray_tributary_bytes_total",
                    "ray_tributary_round_overhead_seconds", "ray_tributary_replay_ratio",
                    "ray_tributary_lr_scale", "ray_tributary_staleness"}
# Served by a merge.mode async run besides those.
ASYNC_METRICS = {"ray_tributary_updates_per_minute", "ray_tributary_idle_seconds"}
ON_FAILURE_METRICS = {"ray_tributary_worker_failures_total",
                      "ray_tributary_quarantined_files_total"}


def served_metrics(url: str, *, run: str, wait_for: set[str] = frozenset(),
                   timeout_s: float = 60) -> set[str]:
    """Names of the tributary_ metrics of `run` that Ray's Prometheus endpoint serves now
    (waiting up to `timeout_s` for the ones in `wait_for`: the export interval lags)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            text = requests.get(url, timeout=2).text
        except requests.RequestException:
            text = ""
        names = {line.split("{")[0] for line in text.splitlines()
                 if line.startswith("ray_tributary_") and f'run="{run}"' in line}
        if wait_for <= names or time.monotonic() > deadline:
            return names
        time.sleep(1)


@pytest.fixture(scope="session")
def two_rounds(ray_cluster, demo_root, notes_site, tmp_path_factory):
    """A 2-round run of the tiny config, watched from outside while it runs (named actors,
    Ray metrics); also the uninterrupted baseline that resumed runs must reproduce."""
    run_dir = tmp_path_factory.mktemp("baseline") / "uninterrupted-run"
    config = tiny_config(demo_root, notes_site, run_dir)
    seen = {"actors": set(), "metrics": set()}
    thread = threading.Thread(target=lambda: seen.update(result=run_training(config)))
    thread.start()
    url = f"http://127.0.0.1:{ray_cluster['metrics_port']}/metrics"
    while thread.is_alive():
        seen["actors"] |= {a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                           if a["namespace"] == "tributary"}
        seen["metrics"] |= served_metrics(url, run=run_dir.name, timeout_s=0)
        time.sleep(0.5)
    seen["metrics_during_run"] = set(seen["metrics"])
    # The export interval can lag the short test run.
    seen["metrics"] |= served_metrics(url, run=run_dir.name, wait_for=EXPECTED_METRICS)
    thread.join()
    assert "result" in seen, "run_training raised; see the log above"
    return run_dir, seen
