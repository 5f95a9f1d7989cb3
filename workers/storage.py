"""Where site data lives: a local path or any pyarrow filesystem URI (s3://, gs://, hdfs://,
file://). Readers get a `DataFile` that knows its filesystem, so the same code reads a local
folder or a bucket prefix."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from urllib.parse import urlsplit, urlunsplit

import pyarrow.fs as pafs

# Query parameters that carry credentials (signed URLs, tokens): never written anywhere.
SECRET_WORDS = ("key", "secret", "token", "signature", "credential", "password", "sig")


def is_uri(location: str | Path) -> bool:
    return "://" in str(location)


def redact(location: str | Path) -> str:
    """The location without credentials (`s3://KEY:SECRET@bucket/...`, signed query
    strings): what Tributary writes to configs, manifests, logs and job fields. Unchanged when
    it holds none. Credentials reach Tributary through the environment instead."""
    text = str(location)
    if not is_uri(text):
        return text
    parts = urlsplit(text)
    netloc = parts.netloc.rsplit("@", 1)[-1]
    kept = [item for item in parts.query.split("&") if item and not _secret(item)]
    query = "&".join(kept)
    if netloc == parts.netloc and query == parts.query:
        return text
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def _secret(item: str) -> bool:
    name = item.split("=", 1)[0].lower()
    return any(word in name for word in SECRET_WORDS)


def locate(location: str | Path) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) for a local path or a URI."""
    if is_uri(location):
        return pafs.FileSystem.from_uri(str(location))
    return pafs.LocalFileSystem(), str(Path(location).absolute())


@dataclass(frozen=True)
class DataFile:
    """One file on some filesystem; `str()` is the name users wrote (path or URI), without
    credentials."""

    filesystem: pafs.FileSystem
    path: str
    uri: str

    @property
    def name(self) -> str:
        return PurePosixPath(self.path).name

    @property
    def suffix(self) -> str:
        return PurePosixPath(self.path).suffix

    @property
    def is_local(self) -> bool:
        return isinstance(self.filesystem, pafs.LocalFileSystem)

    def info(self) -> pafs.FileInfo:
        info = self.filesystem.get_file_info(self.path)
        if info.type == pafs.FileType.NotFound:
            raise FileNotFoundError(self.uri)
        return info

    def size(self) -> int:
        return self.info().size

    def open(self):
        """A sequential input stream (read in blocks: memory does not grow with the file)."""
        return self.filesystem.open_input_stream(self.path)

    def open_random(self):
        """A random-access file (Parquet reads its footer first)."""
        return self.filesystem.open_input_file(self.path)

    def sha256(self, *, block: int = 1 << 20) -> str:
        digest = hashlib.sha256()
        with self.open() as stream:
            while chunk := stream.read(block):
                digest.update(chunk)
        return digest.hexdigest()

    def escapes(self, folder: str) -> bool:
        """A local symlink whose target lies outside `folder` (the site's own files only)."""
        if not self.is_local or not os.path.islink(self.path):
            return False
        target, root = os.path.realpath(self.path), os.path.realpath(folder)
        return os.path.commonpath([target, root]) != root

    def exists(self) -> bool:
        return self.filesystem.get_file_info(self.path).type == pafs.FileType.File

    def __str__(self) -> str:
        return self.uri


def data_file(location: str | Path | DataFile) -> DataFile:
    if isinstance(location, DataFile):
        return location
    filesystem, path = locate(location)
    return DataFile(filesystem, path, redact(location))


def list_files(location: str | Path, *, suffixes: set[str],
               settled_before: float | None = None) -> list[DataFile]:
    """The file itself, or the folder's files with one of `suffixes` in name order (hidden
    ones, starting with '.', left out: in-progress uploads). With `settled_before` (a Unix
    time), files modified after it are left out too: they may still be being written."""
    filesystem, path = locate(location)
    info = filesystem.get_file_info(path)
    if info.type == pafs.FileType.File:
        return [DataFile(filesystem, path, redact(location))]
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"{redact(location)}: no such file or folder")
    entries = filesystem.get_file_info(pafs.FileSelector(path, recursive=False))
    base = redact(location).rstrip("/")
    files = [DataFile(filesystem, e.path, _child(base, e.base_name)) for e in entries
             if e.type == pafs.FileType.File and not e.base_name.startswith(".")
             and PurePosixPath(e.base_name).suffix in suffixes
             and (settled_before is None or e.mtime is None
                  or e.mtime.timestamp() <= settled_before)]
    return sorted(files, key=lambda f: f.name)


def _child(base: str, name: str) -> str:
    """`base/name`; a URI keeps its query string (`?endpoint_override=...`) at the end."""
    if not is_uri(base):
        return str(Path(base) / name)
    path, mark, query = base.partition("?")
    return f"{path.rstrip('/')}/{name}{mark}{query}"


def base_name(location: str | Path) -> str:
    """The last path segment of a path or URI (a URI's query string left out)."""
    return PurePosixPath(urlsplit(str(location)).path if is_uri(location)
                         else str(location)).name


def join(base: str, *names: str) -> str:
    """`base/name/...` for a URI or a local path."""
    for name in names:
        base = _child(base.rstrip("/"), name)
    return base


# Written last into a published folder: a reader that finds it knows every file is there
# (object stores have no rename, so a folder cannot appear at once).
PUBLISHED = "_COMPLETE"


def publish_folder(local: Path, uri: str) -> None:
    """Copy a local folder to `uri`, then its completion marker."""
    upload_tree(local, uri)
    write_text(join(uri, PUBLISHED), "")


def is_published(uri: str) -> bool:
    return read_text(join(uri, PUBLISHED)) is not None


def fetch_published(uri: str, local: Path) -> bool:
    """Copy a published folder here (without its marker); False if it is not complete."""
    if not is_published(uri):
        return False
    download_tree(uri, local)
    (local / PUBLISHED).unlink(missing_ok=True)
    return True


def upload_tree(local: Path, uri: str) -> None:
    """Copy a local folder's files to `uri` (overwriting), as pyarrow's copy_files does."""
    filesystem, path = locate(uri)
    filesystem.create_dir(path, recursive=True)
    pafs.copy_files(str(local), path, source_filesystem=pafs.LocalFileSystem(),
                    destination_filesystem=filesystem)


def download_tree(uri: str, local: Path) -> None:
    filesystem, path = locate(uri)
    local.mkdir(parents=True, exist_ok=True)
    pafs.copy_files(path, str(local), source_filesystem=filesystem,
                    destination_filesystem=pafs.LocalFileSystem())


def write_text(uri: str, text: str) -> None:
    filesystem, path = locate(uri)
    filesystem.create_dir(str(PurePosixPath(path).parent), recursive=True)
    with filesystem.open_output_stream(path) as stream:
        stream.write(text.encode())


def read_text(uri: str) -> str | None:
    """The file's text, or None if it does not exist."""
    filesystem, path = locate(uri)
    if filesystem.get_file_info(path).type != pafs.FileType.File:
        return None
    with filesystem.open_input_stream(path) as stream:
        return stream.read().decode()


def list_names(uri: str) -> list[str]:
    """Names directly under `uri` (none if it does not exist)."""
    filesystem, path = locate(uri)
    if filesystem.get_file_info(path).type != pafs.FileType.Directory:
        return []
    return sorted(e.base_name for e in
                  filesystem.get_file_info(pafs.FileSelector(path, recursive=False)))


def delete_tree(uri: str) -> None:
    filesystem, path = locate(uri)
    if filesystem.get_file_info(path).type == pafs.FileType.Directory:
        filesystem.delete_dir(path)
