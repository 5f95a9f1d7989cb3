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
from safetensors.torch import load_file, save_file

from trainer.faults import kill_point
from workers.fsio import atomic_dir, atomic_write, fsync_dir

VERSIONS = "versions"
LATEST = "latest"
REJECTED = "rejected"  # versions/rejected/vNNNN: candidates the quality gate refused
# versions/superseded/vNNNN: versions past a resume's starting point (their rows are trained again)
SUPERSEDED = "superseded"
OUTER_STATE = "outer_state.safetensors"  # the merge strategy's optimizer state, if any


def version_name(number: int) -> str:
    return f"v{number:04d}"


def version_number(folder: Path) -> int:
    """vNNNN's number (names are zero-padded to 4 digits only: v10000 sorts before v9999)."""
    return int(folder.name[1:])


def save_version(run_dir: Path, *, number: int, model: torch.nn.Module, tokenizer,
                 manifest: dict, rejected: bool = False,
                 outer_state: dict[str, torch.Tensor] | None = None,
                 weights: bool = True, max_shard_size: str = "5GB") -> Path:
    """Write version `number` with its manifest (and the merge strategy's outer-optimizer
    state, if it keeps one) and point `latest` at it (a rejected version goes to
    versions/rejected/ and `latest` stays where it is). `weights=False` writes the manifest
    only (run.eval_every): such a version is lineage, never `latest`. Weights over
    `max_shard_size` are written in shards with an index, as `from_pretrained` reads them."""
    versions = run_dir / VERSIONS / REJECTED if rejected else run_dir / VERSIONS
    final = versions / version_name(number)
    with atomic_dir(final) as tmp:
        if weights:
            model.save_pretrained(tmp, max_shard_size=max_shard_size)
            tokenizer.save_pretrained(tmp)
        if outer_state and weights:
            save_file({k: v.contiguous() for k, v in outer_state.items()}, str(tmp / OUTER_STATE))
        weights = {p.name: sha256_file(p) for p in sorted(tmp.glob("*.safetensors"))}
        full = {**manifest, "version": number, "name": version_name(number),
                "weights_sha256": weights}
        write_json(tmp / "manifest.json", full)
        kill_point("checkpoint", manifest.get("round", 0))  # written, not yet renamed
    kill_point("renamed", manifest.get("round", 0))  # in place, `latest` not yet moved
    if not rejected and weights:
        point_latest(run_dir, version_name(number))
    return final


def load_outer_state(version_dir: Path) -> dict[str, torch.Tensor]:
    """The merge strategy's outer state saved with a version ({} if it keeps none)."""
    path = version_dir / OUTER_STATE
    return load_file(str(path)) if path.is_file() else {}


def point_latest(run_dir: Path, name: str) -> None:
    versions = run_dir / VERSIONS
    tmp_link = versions / f".tmp-{LATEST}"
    if tmp_link.is_symlink() or tmp_link.exists():
        tmp_link.unlink()
    os.symlink(name, tmp_link)
    os.replace(tmp_link, versions / LATEST)
    fsync_dir(versions)


def latest_version(run_dir: Path) -> Path | None:
    link = run_dir / VERSIONS / LATEST
    return link.resolve() if link.exists() else None


def read_manifest(version_dir: Path) -> dict:
    return json.loads((version_dir / "manifest.json").read_text())


def all_manifests(run_dir: Path, *, include_rejected: bool = False) -> list[dict]:
    """Manifests of the accepted versions (and the rejected ones), by version number."""
    folders = [p for p in (run_dir / VERSIONS).glob("v[0-9]*") if p.is_dir()]
    if include_rejected:
        folders += [p for p in (run_dir / VERSIONS / REJECTED).glob("v[0-9]*") if p.is_dir()]
    return [read_manifest(p) for p in sorted(folders, key=version_number)]


def prune_versions(run_dir: Path, *, keep: int) -> list[Path]:
    """Drop the weights of all but the newest `keep` accepted (and rejected) versions; their
    manifest.json stays, so lineage is complete. `latest` is always among those kept.
    Returns the folders pruned."""
    pruned, latest = [], latest_version(run_dir)
    for folder in (run_dir / VERSIONS, run_dir / VERSIONS / REJECTED):
        versions = sorted((p for p in folder.glob("v[0-9]*") if p.is_dir()
                           and any(p.glob("*.safetensors"))), key=version_number)
        for old in [v for v in versions[:-keep] if v.resolve() != latest]:
            if drop_weights(old):
                pruned.append(old)
    return pruned


def drop_weights(folder: Path) -> bool:
    """Delete everything of a version folder but its manifest (the lineage stays); True if
    anything was there to delete."""
    files = [f for f in folder.iterdir() if f.name != "manifest.json"]
    for item in files:
        if item.is_dir():
            shutil.rmtree(item)
        else:
            item.unlink()
    return bool(files)


def supersede(run_dir: Path, *, after: int) -> list[Path]:
    """Move accepted versions past `after` (a resume's starting point) to
    versions/superseded/: their rows are trained again, so their manifests no longer count
    in the lineage; kept for the audit. Returns the new folders."""
    return _move_versions(run_dir, after=after, to=SUPERSEDED)


def reject_versions(run_dir: Path, *, after: int, why: str) -> list[Path]:
    """Move accepted versions past `after` to versions/rejected/, marked rejected with `why`
    (merge.mode async: a rejected version takes back the merges since the last evaluated
    one; their rows stay consumed, as a rejected version's do). Returns the new folders."""
    moved = _move_versions(run_dir, after=after, to=REJECTED)
    for folder in moved:
        manifest = read_manifest(folder)
        write_json(folder / "manifest.json",
                   {**manifest, "status": "rejected", "gate": [*manifest["gate"], why]})
    return moved


def _move_versions(run_dir: Path, *, after: int, to: str) -> list[Path]:
    moved = []
    for folder in sorted((run_dir / VERSIONS).glob("v[0-9]*"), key=version_number):
        if folder.is_dir() and not folder.is_symlink() and version_number(folder) > after:
            target = run_dir / VERSIONS / to / folder.name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(target, ignore_errors=True)
            os.rename(folder, target)
            moved.append(target)
    return moved


def write_json(path: Path, data: dict) -> None:
    """Atomic JSON write: temp file, fsync, rename."""
    atomic_write(path, json.dumps(data, indent=2, sort_keys=False))


def append_lines(path: Path, records: list[dict]) -> None:
    """Append JSON lines durably (a record log: each line whole or, after a crash, torn last)."""
    with open(path, "a") as handle:
        handle.writelines(json.dumps(r) + "\n" for r in records)
        handle.flush()
        os.fsync(handle.fileno())


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
