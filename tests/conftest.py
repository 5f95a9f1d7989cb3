"""Shared fixtures: the demo data (real shipped text), prepared once per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# DeepSpeed picks its accelerator at import time; without CUDA it must be told "cpu".
if not os.path.exists("/dev/nvidia0"):
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

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
