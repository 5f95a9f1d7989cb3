"""Increment readers: a site's files, in name order, read as Arrow with pyarrow.dataset.

The format comes from the extension: `.parquet`, `.jsonl`/`.json`, `.txt`. A plain text
file has one row per paragraph (blocks separated by blank lines), so row ranges stay
meaningful for lineage.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as ds

from workers.types import Cursor, RowRange

FORMATS = {".parquet": "parquet", ".jsonl": "json", ".json": "json", ".txt": "text"}


class IncrementError(ValueError):
    """An increment file that cannot be read as text rows; names the file and the fix."""


def increment_files(path: str | Path) -> list[Path]:
    """The increment files of a site: the file itself, or the folder's files in name order."""
    path = Path(path)
    if path.is_file():
        return [path]
    files = [p for p in sorted(path.iterdir()) if p.suffix in FORMATS and not p.name.startswith(".")]
    return files


def read_texts(path: str | Path, *, text_column: str = "text") -> list[str]:
    """All rows' text of one increment file, in row order."""
    path = Path(path)
    kind = FORMATS.get(path.suffix)
    if kind is None:
        raise IncrementError(f"{path}: unknown extension; use one of {sorted(FORMATS)}")
    if kind == "text":
        return _paragraphs(path.read_text(encoding="utf-8"))
    table = ds.dataset(str(path), format=kind).to_table()
    if text_column not in table.column_names:
        raise IncrementError(
            f"{path}: no column {text_column!r} (found {table.column_names}); "
            "set the site's text_column to the column holding the text")
    column = table.column(text_column)
    if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
        raise IncrementError(f"{path}: column {text_column!r} is {column.type}, expected strings")
    return [text or "" for text in column.to_pylist()]


def _paragraphs(text: str) -> list[str]:
    blocks = [block.strip("\n") for block in text.split("\n\n")]
    return [block for block in blocks if block.strip()]


def iter_rows(
    files: list[Path], cursor: Cursor, *, text_column: str
) -> Iterator[tuple[RowRange, str]]:
    """Yield (one-row range, text) from the cursor onwards, across files in name order."""
    names = [f.name for f in files]
    start_index, start_row = 0, 0
    if cursor.file is not None:
        # Files sort by name, so a cursor file that is gone still has a well-defined place.
        start_index = sum(1 for name in names if name < cursor.file)
        if start_index < len(names) and names[start_index] == cursor.file:
            start_row = cursor.row
    for index in range(start_index, len(files)):
        texts = read_texts(files[index], text_column=text_column)
        first = start_row if index == start_index else 0
        for row in range(first, len(texts)):
            yield RowRange(files[index].name, row, row + 1), texts[row]


def merge_ranges(ranges: list[RowRange]) -> tuple[RowRange, ...]:
    """Coalesce adjacent one-row ranges of the same file into {file, start_row, end_row}."""
    merged: list[RowRange] = []
    for r in ranges:
        if merged and merged[-1].file == r.file and merged[-1].end_row == r.start_row:
            merged[-1] = RowRange(r.file, merged[-1].start_row, r.end_row)
        else:
            merged.append(r)
    return tuple(merged)


def cursor_after(ranges: tuple[RowRange, ...], previous: Cursor) -> Cursor:
    if not ranges:
        return previous
    return Cursor(file=ranges[-1].file, row=ranges[-1].end_row)
