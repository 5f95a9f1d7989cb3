"""Which version a server may serve, and where its files are: a run folder or a run URI.

Only accepted versions are ever named: `versions/latest` (a symlink) or `versions/LATEST` (a
text file, on object stores) points at accepted versions only, and a name is checked against
its manifest before it is handed out, so a rejected candidate (versions/rejected/…) or a
version whose weights were pruned is never loaded.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path

from trainer import checkpoint
from trainer.mirror import LATEST_FILE, uri_key
from trainer.model_source import cache_dir
from workers.storage import fetch_published, is_uri, join, read_text, redact

VERSION_NAME = re.compile(r"v\d{4,}")


class VersionError(ValueError):
    """A version that cannot be served (unknown, rejected, pruned): the message says which."""


class VersionSource:
    """The accepted versions of one run, local (`RUN_DIR`) or published (`s3://…/RUN`)."""

    def __init__(self, run_dir: str | Path, *, cache: Path | None = None) -> None:
        self.location = str(run_dir)
        self.remote = is_uri(self.location)
        self.cache = cache or cache_dir() / "serve"

    @property
    def run_name(self) -> str:
        return self.location.rstrip("/").rsplit("/", 1)[-1]

    def config_text(self) -> str:
        """The run's resolved config.yaml (it names the base model of a LoRA run)."""
        text = (read_text(join(self.location, "config.yaml")) if self.remote
                else _read(Path(self.location) / "config.yaml"))
        if text is None:
            raise VersionError(f"{self.shown}: no config.yaml; is this a Tributary run folder?")
        return text

    def latest(self) -> str | None:
        """The name of the newest accepted version, or None while the run has none."""
        if self.remote:
            text = read_text(join(self.location, checkpoint.VERSIONS, LATEST_FILE))
            return text.strip() or None if text else None
        link = Path(self.location) / checkpoint.VERSIONS / checkpoint.LATEST
        try:
            return os.readlink(link)
        except (FileNotFoundError, OSError):
            return None

    def identity(self, name: str) -> str | None:
        """What version `name` holds: its manifest's weight digests. A retraction makes the
        same name again with other weights; None where the manifest cannot be read."""
        text = (read_text(join(self.location, checkpoint.VERSIONS, name, "manifest.json"))
                if self.remote else
                _read(Path(self.location) / checkpoint.VERSIONS / name / "manifest.json"))
        return _weights_digest(text)

    def folder(self, name: str) -> Path:
        """A local folder holding version `name`'s weights and tokenizer, checked to be an
        accepted version with weights (downloaded first from a run URI, again when the
        cached copy is not what the run now publishes under that name)."""
        if not VERSION_NAME.fullmatch(name):
            raise VersionError(f"{name!r} is not a version name (expected e.g. v0003)")
        if self.remote:
            local = self.cache / uri_key(self.location) / name
            cached = _weights_digest(_read(local / "manifest.json"))
            if cached is None or cached != self.identity(name):
                self._download(name, local)
        else:
            local = Path(self.location) / checkpoint.VERSIONS / name
        self._check(name, local)
        return local

    def keep_cached(self, names: set[str]) -> None:
        """Drop cached versions of this run other than `names` (the current and previous):
        the cache holds a few versions, not the run's history."""
        if not self.remote:
            return
        folder = self.cache / uri_key(self.location)
        for path in folder.glob("v*"):
            if VERSION_NAME.fullmatch(path.name) and path.name not in names:
                shutil.rmtree(path, ignore_errors=True)

    def _download(self, name: str, local: Path) -> None:
        """Into a folder of this call's own (replicas on one node share the cache), then
        moved into place whole: a reader never sees a partial copy."""
        local.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{name}-", dir=local.parent))
        try:
            if not fetch_published(join(self.location, checkpoint.VERSIONS, name), tmp):
                raise VersionError(f"{self.shown}: version {name} is not an accepted, "
                                   "published version (see versions/ and versions/rejected/)")
            if local.exists():  # a stale copy (a retraction remade the name): set it aside
                stale = Path(tempfile.mkdtemp(prefix=f".old-{name}-", dir=local.parent))
                os.replace(local, stale / name)
                shutil.rmtree(stale, ignore_errors=True)
            try:
                os.replace(tmp, local)
            except OSError:  # another replica put its copy there first: it is the same
                if _weights_digest(_read(local / "manifest.json")) is None:
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def _check(self, name: str, folder: Path) -> None:
        manifest = _read(folder / "manifest.json")
        if manifest is None:
            rejected = (Path(self.location) / checkpoint.VERSIONS / checkpoint.REJECTED / name)
            why = ("it was rejected by the quality gate" if not self.remote and rejected.is_dir()
                   else "no such accepted version")
            raise VersionError(f"{self.shown}: cannot serve {name}: {why}")
        status = json.loads(manifest).get("status", "accepted")
        if status != "accepted":
            raise VersionError(f"{self.shown}: cannot serve {name}: its status is {status}")
        if not any(folder.glob("*.safetensors")):
            raise VersionError(f"{self.shown}: {name}'s weights were pruned (run.keep_versions);"
                               " serve a newer version")

    @property
    def shown(self) -> str:
        return redact(self.location)


def _weights_digest(manifest: str | None) -> str | None:
    if manifest is None:
        return None
    weights = json.loads(manifest).get("weights_sha256")
    return json.dumps(weights, sort_keys=True) if weights else None


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except (FileNotFoundError, NotADirectoryError):
        return None

