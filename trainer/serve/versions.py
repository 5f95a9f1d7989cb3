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

    def folder(self, name: str) -> Path:
        """A local folder holding version `name`'s weights and tokenizer, checked to be an
        accepted version with weights (downloaded first from a run URI)."""
        if not VERSION_NAME.fullmatch(name):
            raise VersionError(f"{name!r} is not a version name (expected e.g. v0003)")
        if self.remote:
            local = self.cache / uri_key(self.location) / name
            if not (local / "manifest.json").is_file():
                self._download(name, local)
        else:
            local = Path(self.location) / checkpoint.VERSIONS / name
        self._check(name, local)
        return local

    def _download(self, name: str, local: Path) -> None:
        tmp = local.with_name(f".tmp-{name}")
        shutil.rmtree(tmp, ignore_errors=True)
        if not fetch_published(join(self.location, checkpoint.VERSIONS, name), tmp):
            raise VersionError(f"{self.shown}: version {name} is not an accepted, published "
                               "version (see versions/ and versions/rejected/)")
        os.replace(tmp, local)  # whole or absent: a later call never sees a partial copy

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


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except (FileNotFoundError, NotADirectoryError):
        return None

