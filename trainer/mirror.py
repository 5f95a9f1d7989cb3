"""A run directory on an object store or HDFS: `run.dir: s3://…` (gs://, hdfs://, file://).

Object stores have no rename and no append, so the run works in a local staging folder as
usual (atomic renames, fsync) and each version is then published to the URI: the version's
files, its replay snapshot, `metrics.jsonl` and `config.yaml`, and last `versions/LATEST`
(the newest accepted version's name) — a reader that follows LATEST never meets a version
before all its files are there. `tributary resume URI` pulls back what a resume reads (every
manifest, the latest version, its replay snapshot, the metrics) into an empty staging folder.
Workers publish their committed optimizer state under `sites/` themselves (workers/worker.py).
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
from pathlib import Path, PurePosixPath

import pyarrow.fs as pafs

from trainer import checkpoint
from trainer.resume import resume_manifest
from workers.retry import retrying
from workers.storage import (
    base_name,
    delete_tree,
    download_tree,
    is_published,
    join,
    list_names,
    locate,
    publish_folder,
    read_text,
    redact,
    upload_tree,
    write_text,
)

STAGING_ENV = "TRIBUTARY_STAGING_DIR"  # default ~/.cache/tributary/staging
LATEST_FILE = "LATEST"
QUARANTINE = "quarantine"  # records of damaged input files (the files stay in place)
VERSION_NAME = re.compile(r"v\d{4,}")
PUBLISH_ATTEMPTS = 8  # about two minutes of backoff before a publishing fault stops the run


def staging_dir(uri: str) -> Path:
    """The local working copy of a URI run: one folder per URI, named like the run (so the
    `run` tag of metrics is the same)."""
    root = Path(os.environ.get(STAGING_ENV, "~/.cache/tributary/staging")).expanduser()
    return root / uri_key(uri) / base_name(uri.rstrip("/"))


def uri_key(uri: str) -> str:
    """A short folder name for a URI's local copies (credentials left out)."""
    return hashlib.sha256(redact(uri).encode()).hexdigest()[:12]


class Mirror:
    def __init__(self, uri: str, local: Path) -> None:
        self.uri = uri  # may hold credentials: use it, never print or write it (redact)
        self.local = local

    def exists(self) -> bool:
        """Does the URI already hold a run?"""
        return bool(list_names(join(self.uri, checkpoint.VERSIONS)))

    def publish(self, number: int, *, rejected: bool, replay_dir: Path) -> None:
        """Upload version `number`, then the run's files, then move LATEST. Storage faults
        are retried for a while (the version is safe in staging meanwhile)."""
        retrying(lambda: self._publish(number, rejected=rejected, replay_dir=replay_dir),
                 what=f"publishing v{number:04d} to {redact(self.uri)}",
                 attempts=PUBLISH_ATTEMPTS, backoff_s=1.0)

    def _publish(self, number: int, *, rejected: bool, replay_dir: Path) -> None:
        name = checkpoint.version_name(number)
        parts = [checkpoint.VERSIONS, checkpoint.REJECTED] if rejected else [checkpoint.VERSIONS]
        if replay_dir.is_dir():  # first: a complete version always finds its snapshot
            publish_folder(replay_dir, join(self.uri, "replay", name))
        publish_folder(self.local.joinpath(*parts, name), join(self.uri, *parts, name))
        for file in ("metrics.jsonl", "config.yaml"):
            if (self.local / file).is_file():
                write_text(join(self.uri, file), (self.local / file).read_text())
        if (self.local / QUARANTINE).is_dir():
            upload_tree(self.local / QUARANTINE, join(self.uri, QUARANTINE))
        if not rejected:
            write_text(join(self.uri, checkpoint.VERSIONS, LATEST_FILE), name + "\n")

    def moved(self, folders: list[Path], *, to: str) -> None:
        """Versions moved here from versions/ to versions/`to`/ (trainer/checkpoint.py:
        superseded by a resume, or taken back by an asynchronous rejection) move at the URI
        too: the new place first, so a crash in between leaves a copy, never none."""
        for folder in folders:
            retrying(lambda f=folder: self._move(f, to=to),
                     what=f"moving {folder.name} to versions/{to} at {redact(self.uri)}",
                     attempts=PUBLISH_ATTEMPTS, backoff_s=1.0)

    def _move(self, folder: Path, *, to: str) -> None:
        publish_folder(folder, join(self.uri, checkpoint.VERSIONS, to, folder.name))
        old = join(self.uri, checkpoint.VERSIONS, folder.name)
        if list_names(old):
            delete_tree(old)

    def prune(self) -> None:
        """Versions whose weights were pruned here lose them at the URI too."""
        for parts in ([checkpoint.VERSIONS], [checkpoint.VERSIONS, checkpoint.REJECTED]):
            for folder in self.local.joinpath(*parts).glob("v[0-9]*"):
                if (folder / "manifest.json").is_file() and not any(folder.glob("*.safetensors")):
                    remote = join(self.uri, *parts, folder.name)
                    for item in list_names(remote):
                        if item != "manifest.json":
                            _delete(join(remote, item))

    def pull(self) -> None:
        """Fill an empty staging folder with what `resume` reads."""
        shutil.rmtree(self.local, ignore_errors=True)
        self.local.mkdir(parents=True)
        for file in ("metrics.jsonl", "config.yaml"):
            text = read_text(join(self.uri, file))
            if text is not None:
                (self.local / file).write_text(text)
        latest = (read_text(join(self.uri, checkpoint.VERSIONS, LATEST_FILE)) or "").strip()
        if not latest:
            raise FileNotFoundError(f"{redact(self.uri)}: no versions/{LATEST_FILE}; nothing "
                                    "to resume")
        _check_version_name(latest, where=f"versions/{LATEST_FILE}")
        for parts in ([checkpoint.VERSIONS], [checkpoint.VERSIONS, checkpoint.REJECTED]):
            for name in [n for n in list_names(join(self.uri, *parts))
                         if VERSION_NAME.fullmatch(n)]:
                remote = join(self.uri, *parts, name)
                if name != latest and not is_published(remote):
                    continue  # uploaded part-way before a crash: as if it was never written
                target = self.local.joinpath(*parts, name)
                target.mkdir(parents=True)
                if name == latest and len(parts) == 1:
                    download_tree(remote, target)
                    continue
                (target / "manifest.json").write_text(read_text(join(remote, "manifest.json")))
        checkpoint.point_latest(self.local, latest)
        self._pull_replay()

    def _pull_replay(self) -> None:
        """The replay snapshot the resume starts from (trainer/resume.py picks it the same
        way: the newest manifest that is rejected or not past `latest`)."""
        replay = resume_manifest(self.local).get("replay")
        if replay:
            parts = PurePosixPath(replay).parts
            # A manifest read from a bucket is input: its path must stay in replay/vNNNN.
            if len(parts) != 2 or parts[0] != "replay" or not VERSION_NAME.fullmatch(parts[1]):
                raise ValueError(f"{redact(self.uri)}: a manifest names replay folder "
                                 f"{replay!r}; expected replay/vNNNN. Refusing to use it.")
            download_tree(join(self.uri, *parts), self.local.joinpath(*parts))


def _check_version_name(name: str, *, where: str) -> None:
    if not VERSION_NAME.fullmatch(name):
        raise ValueError(f"{where} holds {name!r}, not a version name like v0003; refusing to "
                         "use it (was the bucket written by something else?)")


def _delete(uri: str) -> None:
    filesystem, path = locate(uri)
    info = filesystem.get_file_info(path)
    if info.type == pafs.FileType.Directory:
        delete_tree(uri)
    else:
        filesystem.delete_file(path)


def read_remote_config(uri: str) -> str:
    text = read_text(join(uri, "config.yaml"))
    if text is None:
        raise FileNotFoundError(f"{redact(uri)}/config.yaml not found: is this a Tributary run?")
    return text
