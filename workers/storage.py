"""Where site data lives: a local path or any pyarrow filesystem URI (s3://, gs://, hdfs://,
file://). Readers get a `DataFile` that knows its filesystem, so the same code reads a local
folder or a bucket prefix."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import pyarrow.fs as pafs


def is_uri(location: str | Path) -> bool:
    return "://" in str(location)


def locate(location: str | Path) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) for a local path or a URI."""
    if is_uri(location):
        return pafs.FileSystem.from_uri(str(location))
    return pafs.LocalFileSystem(), str(Path(location).absolute())


@dataclass(frozen=True)
class DataFile:
    """One file on some filesystem; `str()` is the name users wrote (path or URI)."""

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

    def size(self) -> int:
        info = self.filesystem.get_file_info(self.path)
        if info.type == pafs.FileType.NotFound:
            raise FileNotFoundError(self.uri)
        return info.size

    def read_bytes(self) -> bytes:
        with self.filesystem.open_input_stream(self.path) as stream:
            return stream.read()

    def exists(self) -> bool:
        return self.filesystem.get_file_info(self.path).type == pafs.FileType.File

    def __str__(self) -> str:
        return self.uri


def data_file(location: str | Path | DataFile) -> DataFile:
    if isinstance(location, DataFile):
        return location
    filesystem, path = locate(location)
    return DataFile(filesystem, path, str(location))


def list_files(location: str | Path, *, suffixes: set[str],
               settled_before: float | None = None) -> list[DataFile]:
    """The file itself, or the folder's files with one of `suffixes` in name order (hidden
    ones, starting with '.', left out: in-progress uploads). With `settled_before` (a Unix
    time), files modified after it are left out too: they may still be being written."""
    filesystem, path = locate(location)
    info = filesystem.get_file_info(path)
    if info.type == pafs.FileType.File:
        return [DataFile(filesystem, path, str(location))]
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"{location}: no such file or folder")
    entries = filesystem.get_file_info(pafs.FileSelector(path, recursive=False))
    base = str(location).rstrip("/")
    files = [DataFile(filesystem, e.path, _child(base, e.base_name)) for e in entries
             if e.type == pafs.FileType.File and not e.base_name.startswith(".")
             and PurePosixPath(e.base_name).suffix in suffixes
             and (settled_before is None or e.mtime is None
                  or e.mtime.timestamp() <= settled_before)]
    return sorted(files, key=lambda f: f.name)


def _child(base: str, name: str) -> str:
    return f"{base}/{name}" if is_uri(base) else str(Path(base) / name)


def join(base: str, *names: str) -> str:
    """`base/name/...` for a URI or a local path."""
    for name in names:
        base = _child(base.rstrip("/"), name)
    return base


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
