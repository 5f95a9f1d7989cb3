"""Shared fixtures: the demo data (real shipped text), prepared once per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# DeepSpeed picks its accelerator at import time; without CUDA it must be told "cpu".
if not os.path.exists("/dev/nvidia0"):
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The object-store tests' credentials reach the Ray workers through the environment (set
# before the test cluster starts), never through a URI or a config file.
from tests.s3_server import CREDENTIALS

for _key, _value in CREDENTIALS.items():
    os.environ.setdefault(_key, _value)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory) -> Path:
    """A folder laid out like the repo root: data/demo prepared, configs/ linked in."""
    from trainer.demo import prepare_demo

    root = tmp_path_factory.mktemp("root")
    prepare_demo(root / "data" / "demo")
    (root / "configs").symlink_to(REPO / "configs")
    return root


# Ray-backed fixtures (only started by tests that ask for them).
from tests.ray_fixtures import notes_site, ray_cluster, two_rounds  # noqa: F401


@pytest.fixture(scope="session")
def s3(tmp_path_factory):
    """A real S3-compatible server (moto) on 127.0.0.1, through a relay that can go down."""
    from tests.s3_server import S3Server

    server = S3Server(tmp_path_factory.mktemp("s3") / "moto.log")
    yield server
    server.stop()
