"""Ray fixtures for the integration and chaos suites: one real local Ray cluster per session
(dashboard and metrics on 127.0.0.1, token auth on) and a JSONL site of real text."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import ray

from cluster.connect import NAMESPACE
from tests.helpers import free_port


@pytest.fixture(scope="session")
def ray_cluster():
    metrics_port = free_port()
    ray.init(namespace=NAMESPACE, num_cpus=2, include_dashboard=True,
             dashboard_host="127.0.0.1", dashboard_port=free_port(),
             _metrics_export_port=metrics_port)
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
            for text in texts[index * 8:(index + 1) * 8]:
                handle.write(json.dumps({"body": text, "id": index}) + "\n")
    return folder


