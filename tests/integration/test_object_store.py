"""Object storage for real: a local S3-compatible server (moto) on 127.0.0.1 through pyarrow's
S3 filesystem — site data, an eval set and the run directory in buckets, a resume from an
empty staging folder — and a transient fault: the S3 endpoint goes down in the middle of a
round and comes back. The run completes, no object in the data bucket changes, nothing is
recorded as damaged, every row is trained exactly once, and the credentials in a site's URI
are written nowhere."""

from __future__ import annotations

import hashlib
import shutil
import threading
import time
from pathlib import Path

import pyarrow.fs as pafs
import pytest
import ray.cloudpickle

from tests.chaos import misbehaving
from tests.helpers import assert_rows_exactly_once, tiny_config
from trainer.checkpoint import all_manifests
from trainer.cli import main as cli
from trainer.coordinator import run_training
from trainer.mirror import STAGING_ENV, staging_dir

pytestmark = pytest.mark.integration
ray.cloudpickle.register_pickle_by_value(misbehaving)
SECRET = "SECRETinTHEuri"


def upload(s3, local: Path, key: str) -> None:
    filesystem = s3.filesystem()
    filesystem.create_dir(key.split("/")[0])
    pafs.copy_files(str(local), key, source_filesystem=pafs.LocalFileSystem(),
                    destination_filesystem=filesystem)


def objects(s3, bucket: str) -> dict[str, str]:
    filesystem = s3.filesystem()
    found = filesystem.get_file_info(pafs.FileSelector(bucket, recursive=True))
    digests = {}
    for info in found:
        if info.type == pafs.FileType.File:
            with filesystem.open_input_stream(info.path) as stream:
                digests[info.path] = hashlib.sha256(stream.read()).hexdigest()
    return digests


def wait_for(path: Path, *, timeout_s: float, run: threading.Thread) -> None:
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        assert run.is_alive(), f"the run ended before {path.name}"
        assert time.monotonic() < deadline, f"timed out waiting for {path.name}"
        time.sleep(0.1)


def test_buckets_for_data_and_run_survive_an_endpoint_outage_mid_round(
        s3, ray_cluster, demo_root, notes_site, tmp_path, monkeypatch, capfd):
    monkeypatch.setenv(STAGING_ENV, str(tmp_path / "staging"))
    upload(s3, notes_site, "data/notes")
    upload(s3, demo_root / "data" / "demo" / "eval" / "code.jsonl", "data/eval/code.jsonl")
    before = objects(s3, "data")
    s3.filesystem().create_dir("runs")  # the bucket for runs (buckets are the user's to make)
    run_uri = s3.uri("runs/run1")
    config = tiny_config(demo_root, notes_site, run_uri, rounds=3, **{
        "sites.notes.path": s3.uri("data/notes", userinfo=f"keyid:{SECRET}@"),
        "eval[1].path": s3.uri("data/eval/code.jsonl")})
    gate = tmp_path / "gate"
    gate.mkdir()
    worker = misbehaving.gated_worker(site="notes", round_index=2, folder=str(gate))
    failure: list[BaseException] = []

    def run() -> None:
        try:
            run_training(config, worker_cls=worker)
        except BaseException as exc:  # noqa: BLE001 - re-raised by the test below
            failure.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    wait_for(gate / "started", timeout_s=300, run=thread)
    s3.relay.down()  # the endpoint is gone: connections refused, open ones reset
    (gate / "go").write_text("")
    wait_for(gate / "returned", timeout_s=300, run=thread)
    s3.relay.up()
    thread.join()
    if failure:
        raise failure[0]
    assert (gate / "returned").read_text() == "sat out"

    staged = staging_dir(run_uri)
    manifests = all_manifests(staged)
    assert [m["round"] for m in manifests] == [0, 1, 2, 3]
    assert "still failing after" in manifests[2]["unavailable"]["notes"]
    assert "notes" not in manifests[2]["increments"] and "notes" in manifests[3]["increments"]
    assert objects(s3, "data") == before  # not one object of the user's data changed
    assert not (staged / "quarantine").exists()
    assert all(not m["quarantined"] for m in manifests)
    assert_rows_exactly_once(staged, "notes", text_column="body",
                             location=s3.uri("data/notes"))
    published = objects(s3, "runs")
    assert "runs/run1/versions/v0003/model.safetensors" in published

    shutil.rmtree(staged)  # a new machine: resume from the bucket alone
    assert cli(["resume", run_uri, "--set", "rounds=4"]) == 0
    assert [m["round"] for m in all_manifests(staging_dir(run_uri))] == [0, 1, 2, 3, 4]
    assert_rows_exactly_once(staging_dir(run_uri), "notes", text_column="body",
                             location=s3.uri("data/notes"))

    # The credentials in the site's URI were used, and written nowhere.
    written = [p for p in staging_dir(run_uri).rglob("*") if p.is_file()
               and p.suffix in (".json", ".jsonl", ".yaml", ".txt")]
    assert written and not [p for p in written if SECRET in p.read_text()]
    filesystem = s3.filesystem()
    for key in [k for k in objects(s3, "runs") if k.endswith((".json", ".jsonl", ".yaml"))]:
        with filesystem.open_input_stream(key) as stream:
            assert SECRET not in stream.read().decode(), key
    out, err = capfd.readouterr()
    assert SECRET not in out + err
