"""run.dir as a URI: the run works in a local staging folder and publishes every version, its
replay snapshot, the metrics and the workers' optimizer state to the URI; `resume URI` on a
machine with nothing staged carries on exactly. (file:// goes through pyarrow's filesystem
layer like s3:// or gs://, which cannot be reached from the test machines.)"""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import tiny_config
from trainer.cli import main as cli
from trainer.coordinator import run_training
from trainer.mirror import STAGING_ENV, staging_dir

pytestmark = pytest.mark.integration


def test_uri_run_publishes_versions_and_resumes_from_nothing_local(
        two_rounds, ray_cluster, demo_root, notes_site, tmp_path, monkeypatch):
    monkeypatch.setenv(STAGING_ENV, str(tmp_path / "staging"))
    bucket = tmp_path / "bucket"
    uri = f"file://{bucket}/run"
    run_training(tiny_config(demo_root, notes_site, uri, rounds=1))

    remote = bucket / "run"
    assert (remote / "versions" / "LATEST").read_text().strip() == "v0001"
    for version in ("v0000", "v0001"):
        assert (remote / "versions" / version / "model.safetensors").is_file()
        assert (remote / "versions" / version / "manifest.json").is_file()
    assert len((remote / "metrics.jsonl").read_text().splitlines()) == 2
    assert (remote / "config.yaml").read_text().count(uri) == 1  # the URI, not the staging
    for site in ("speeches", "notes"):
        state = remote / "sites" / site / "state" / "round-0001"
        assert (state / "_COMPLETE").is_file() and (state / "optimizer.safetensors").is_file()

    shutil.rmtree(staging_dir(uri))  # a new machine: nothing staged, no worker state here
    assert cli(["resume", uri, "--set", "rounds=2"]) == 0  # the config comes from the URI
    assert (remote / "versions" / "LATEST").read_text().strip() == "v0002"
    expected = load_file(str(two_rounds[0] / "versions" / "v0002" / "model.safetensors"))
    resumed = load_file(str(remote / "versions" / "v0002" / "model.safetensors"))
    assert all(torch.equal(expected[k], resumed[k]) for k in expected)
