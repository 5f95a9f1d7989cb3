"""Durable writes: fsync a folder's files and the folder itself before it is renamed into place."""

from __future__ import annotations

import os
from pathlib import Path


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
