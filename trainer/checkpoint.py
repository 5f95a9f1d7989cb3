"""Versions and lineage: RUN_DIR/versions/vNNNN (safetensors + tokenizer + manifest.json).

A version is written into a temporary folder, fsynced, and renamed into place, so a crash
never leaves a half-written version; `versions/latest` is then re-pointed atomically.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import torch

from trainer.faults import kill_point

VERSIONS = "versions"
LATEST = "latest"


def version_name(number: int) -> str:
    return f"v{number:04d}"


def save_version(run_dir: Path, *, number: int, model: torch.nn.Module, tokenizer,
                 manifest: dict) -> Path:
    """Write version `number` with its manifest and point `latest` at it."""
    versions = run_dir / VERSIONS
    final = versions / version_name(number)
    tmp = versions / f".tmp-{version_name(number)}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    weights = {p.name: sha256_file(p) for p in sorted(tmp.glob("*.safetensors"))}
    full = {**manifest, "version": number, "name": version_name(number), "weights_sha256": weights}
    write_json(tmp / "manifest.json", full)
    _fsync_tree(tmp)
    kill_point("checkpoint", manifest.get("round", 0))
    if final.exists():  # left by a crash after rename but before `latest` moved: replace it
        shutil.rmtree(final)
    os.rename(tmp, final)
    _fsync_dir(versions)
    point_latest(run_dir, version_name(number))
    return final


def point_latest(run_dir: Path, name: str) -> None:
    versions = run_dir / VERSIONS
    tmp_link = versions / f".tmp-{LATEST}"
    if tmp_link.is_symlink() or tmp_link.exists():
        tmp_link.unlink()
    os.symlink(name, tmp_link)
    os.replace(tmp_link, versions / LATEST)
    _fsync_dir(versions)


def latest_version(run_dir: Path) -> Path | None:
    link = run_dir / VERSIONS / LATEST
    return link.resolve() if link.exists() else None


def read_manifest(version_dir: Path) -> dict:
    return json.loads((version_dir / "manifest.json").read_text())


def all_manifests(run_dir: Path) -> list[dict]:
    folders = sorted(p for p in (run_dir / VERSIONS).glob("v[0-9]*") if p.is_dir())
    return [read_manifest(p) for p in folders]


def write_json(path: Path, data: dict) -> None:
    """Atomic JSON write: temp file, fsync, rename."""
    tmp = path.with_name(f".tmp-{path.name}")
    with open(tmp, "w") as handle:
        json.dump(data, handle, indent=2, sort_keys=False)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync_tree(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
    _fsync_dir(folder)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
