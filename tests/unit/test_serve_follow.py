"""A replica following a run on an object store (a real S3-compatible server on 127.0.0.1,
real tiny transformers models): it keeps following through an outage and says how long it
could not look, it swaps when a retraction remakes the same version name with other
weights, and its cache holds private downloads and only the current and previous versions."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest
import torch

from tests.helpers import tiny_config
from trainer.checkpoint import sha256_file
from trainer.model_source import load_start_model, load_tokenizer
from trainer.serve.backend import TransformersBackend
from trainer.serve.follow import Follower
from trainer.serve.versions import VersionSource
from workers.storage import join, publish_folder, write_text


def publish(run: str, tmp_path: Path, *, name: str, seed: int, config) -> torch.Tensor:
    """A version of the tiny model (weights from `seed`) published as the run's latest;
    returns one of its weights, to tell versions apart."""
    tokenizer = load_tokenizer("gpt2")
    model = load_start_model(config.model, tokenizer=tokenizer, seed=seed)
    folder = tmp_path / f"{name}-{seed}"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    digests = {p.name: sha256_file(p) for p in sorted(folder.glob("*.safetensors"))}
    (folder / "manifest.json").write_text(json.dumps(
        {"status": "accepted", "name": name, "weights_sha256": digests}))
    publish_folder(folder, join(run, "versions", name))
    write_text(join(run, "versions", "LATEST"), f"{name}\n")
    return next(model.parameters()).detach().clone()


@pytest.fixture
def run(s3, request, demo_root, notes_site, tmp_path):
    prefix = f"follow-{request.node.name[:40]}".replace("[", "-").replace("]", "")
    s3.filesystem().create_dir(prefix)
    config = tiny_config(demo_root, notes_site, tmp_path / "unused")
    return s3.uri(f"{prefix}/run"), config


def first_weight(backend: TransformersBackend) -> torch.Tensor:
    return next(backend.model.parameters()).detach()


def test_a_replica_follows_through_an_outage_and_a_retraction(s3, run, tmp_path):
    uri, config = run
    first = publish(uri, tmp_path, name="v0001", seed=1, config=config)
    source = VersionSource(uri, cache=tmp_path / "cache")
    backend = TransformersBackend(config=config, first=source.folder("v0001"), version="v0001")
    assert torch.equal(first_weight(backend), first)
    follower = Follower(source, backend, poll_s=0.1, on_swap=lambda swap: None).start()
    try:
        s3.relay.down()  # the bucket is unreachable: every look fails (each after retries)
        deadline = time.monotonic() + 60
        while follower.unable_s < 8 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert follower.unable_s >= 8 and follower.thread.is_alive()
        s3.relay.up()
        deadline = time.monotonic() + 30
        while follower.unable_s > 0 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert follower.unable_s == 0.0
        # A retraction: the same name, other weights. The replica swaps to them.
        remade = publish(uri, tmp_path, name="v0001", seed=2, config=config)
        assert not torch.equal(remade, first)
        deadline = time.monotonic() + 30
        while not torch.equal(first_weight(backend), remade) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert torch.equal(first_weight(backend), remade)
        assert backend.version == "v0001"
    finally:
        follower.stop()
        if s3.relay.listener is None:  # the session's other tests need the endpoint
            s3.relay.up()


def test_the_cache_takes_private_downloads_and_keeps_two_versions(s3, run, tmp_path):
    uri, config = run
    for number in (1, 2, 3):
        publish(uri, tmp_path, name=f"v000{number}", seed=number, config=config)
    cache = tmp_path / "cache"
    replicas = [VersionSource(uri, cache=cache) for _ in range(4)]  # one node's replicas
    folders, errors = [], []

    def fetch(source: VersionSource) -> None:
        try:
            folders.append(source.folder("v0002"))
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=fetch, args=(r,)) for r in replicas]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == [] and len(set(folders)) == 1
    assert sorted(p.name for p in folders[0].glob("*.safetensors")) == ["model.safetensors"]
    replicas[0].folder("v0001")
    replicas[0].folder("v0003")
    run_cache = folders[0].parent
    assert {p.name for p in run_cache.iterdir()} == {"v0001", "v0002", "v0003"}
    replicas[0].keep_cached({"v0003", "v0002"})
    assert {p.name for p in run_cache.iterdir()} == {"v0002", "v0003"}  # no temporary left
