"""Durable, atomic writes: a folder or a file appears complete or not at all.

Every writer fills a temporary sibling, fsyncs it, and renames it into place (then fsyncs the
parent), so a crash never leaves a half-written version, optimizer state or replay snapshot
that a resume would load.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield an empty temporary folder beside `final`; when the block ends without an error
    it is fsynced and renamed to `final` (replacing an older one). On an error it is removed
    and `final` is left as it was."""
    final = Path(final)
    tmp = final.with_name(f".tmp-{final.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        fsync_tree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():  # left by a crash after an earlier rename: this one replaces it
        shutil.rmtree(final)
    os.rename(tmp, final)
    fsync_dir(final.parent)


def atomic_write(path: Path, data: str | bytes) -> None:
    """Write a file whole: temporary sibling, fsync, rename."""
    path = Path(path)
    tmp = path.with_name(f".tmp-{path.name}")
    with open(tmp, "wb") as handle:
        handle.write(data.encode() if isinstance(data, str) else data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def fsync_tree(folder: Path) -> None:
    for path in Path(folder).rglob("*"):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
    for path in [p for p in Path(folder).rglob("*") if p.is_dir()] + [Path(folder)]:
        fsync_dir(path)


def fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
