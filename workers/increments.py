"""Increment readers: a site's files, in name order, read as Arrow with pyarrow.dataset.

The format comes from the extension: `.parquet`, `.jsonl`/`.json`, `.txt`. A plain text
file has one row per paragraph (blocks separated by blank lines), so row ranges stay
meaningful for lineage.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.json as pa_json
import pyarrow.parquet as pq

from workers.storage import DataFile, data_file, list_files, locate
from workers.types import Cursor, RowRange

FORMATS = {".parquet": "parquet", ".jsonl": "json", ".json": "json", ".txt": "text"}


class IncrementError(ValueError):
    """An increment file that cannot be read as text rows; names the file and the fix."""


def increment_files(location: str | Path, *, settle_s: float = 0.0) -> list[DataFile]:
    """The increment files of a site: the file itself, or the folder's files in name order.
    `location` is a local path or a pyarrow filesystem URI (s3://, gs://, hdfs://, file://).
    `settle_s` > 0 (a watched site) leaves out files modified in the last `settle_s` seconds."""
    settled = time.time() - settle_s if settle_s > 0 else None
    return list_files(location, suffixes=set(FORMATS), settled_before=settled)


def push_increment(location: str | Path, table: pa.Table, *, text_column: str = "text",
                   name: str | None = None) -> str:
    """Add an Arrow table as a new increment of a (watched) site; returns the file's path or
    URI. The file is named by the time of the push (so increments sort in arrival order) and
    written under a hidden temporary name, then moved into place, so no reader sees it half
    written."""
    if table.num_rows == 0:
        raise IncrementError(f"{location}: empty increment (0 rows); push at least one row")
    if text_column not in table.column_names or not pa.types.is_string(
            table.schema.field(text_column).type):
        raise IncrementError(f"{location}: the table needs a string column {text_column!r} "
                             f"(found {table.schema}); pass text_column=")
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
    name = name or f"{stamp}-{time.time_ns() % 10**9:09d}-{uuid.uuid4().hex[:8]}.parquet"
    filesystem, folder = locate(location)
    filesystem.create_dir(folder, recursive=True)
    temporary, final = f"{folder}/.{name}.tmp", f"{folder}/{name}"
    pq.write_table(table, temporary, filesystem=filesystem)
    filesystem.move(temporary, final)
    return str(location).rstrip("/") + "/" + name


# What reading a damaged file raises: our own checks, Arrow's parsers, bad bytes, a lost file.
READ_ERRORS = (IncrementError, pa.ArrowException, UnicodeDecodeError, OSError)
MAX_ROW_CHARS = 1_000_000


def read_texts(path: str | Path | DataFile, *, text_column: str = "text",
               max_row_chars: int = MAX_ROW_CHARS) -> list[str]:
    """All rows' text of one increment file, in row order; IncrementError if unusable."""
    path = data_file(path)
    kind = FORMATS.get(path.suffix)
    if kind is None:
        raise IncrementError(f"{path}: unknown extension; use one of {sorted(FORMATS)}")
    size = path.size()
    if size == 0:
        raise IncrementError(f"{path}: empty file (0 bytes); remove it or write its rows")
    texts = _read(path, kind, text_column, size=size)
    for row, text in enumerate(texts):
        if len(text) > max_row_chars:
            raise IncrementError(
                f"{path}: row {row} has {len(text):,} characters, over worker.max_row_chars="
                f"{max_row_chars:,}; split the row or raise the limit")
    return texts


def _read(path: DataFile, kind: str, text_column: str, *, size: int) -> list[str]:
    if kind == "text":
        try:
            return _paragraphs(path.read_bytes().decode("utf-8"))
        except UnicodeDecodeError as exc:
            raise IncrementError(f"{path}: not UTF-8 text (byte {exc.start}); re-encode the "
                                 "file as UTF-8") from exc
    table = ds.dataset(path.path, filesystem=path.filesystem,
                       format=_arrow_format(kind, size=size)).to_table()
    if text_column not in table.column_names:
        raise IncrementError(
            f"{path}: no column {text_column!r} (found {table.column_names}); "
            "set the site's text_column to the column holding the text")
    column = table.column(text_column)
    if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
        raise IncrementError(f"{path}: column {text_column!r} is {column.type}, expected strings")
    return [text or "" for text in column.to_pylist()]


def _arrow_format(kind: str, *, size: int):
    if kind != "json":
        return kind
    # Arrow parses JSON in blocks that must hold a whole line; a longer line comes back as
    # null instead of failing, so make the block as large as the file.
    block = min(max(size + 1, 1 << 20), (1 << 31) - 1)
    return ds.JsonFileFormat(read_options=pa_json.ReadOptions(block_size=block))


def _paragraphs(text: str) -> list[str]:
    blocks = [block.strip("\n") for block in text.split("\n\n")]
    return [block for block in blocks if block.strip()]


def iter_rows(
    files: list[DataFile], cursor: Cursor, *, text_column: str,
    max_row_chars: int = MAX_ROW_CHARS,
    on_bad_file: Callable[[DataFile, str], None] | None = None,
) -> Iterator[tuple[RowRange, str]]:
    """Yield (one-row range, text) from the cursor onwards, across files in name order.

    A file that cannot be read is passed to `on_bad_file(path, reason)` and skipped
    (without the callback, the error propagates)."""
    names = [f.name for f in files]
    start_index, start_row = 0, 0
    if cursor.file is not None:
        # Files sort by name, so a cursor file that is gone still has a well-defined place.
        start_index = sum(1 for name in names if name < cursor.file)
        if start_index < len(names) and names[start_index] == cursor.file:
            start_row = cursor.row
    for index in range(start_index, len(files)):
        try:
            texts = read_texts(files[index], text_column=text_column, max_row_chars=max_row_chars)
        except READ_ERRORS as exc:
            if on_bad_file is None:
                raise
            on_bad_file(files[index], _describe(files[index], exc))
            continue
        first = start_row if index == start_index else 0
        for row in range(first, len(texts)):
            yield RowRange(files[index].name, row, row + 1), texts[row]


def _describe(path: DataFile, exc: BaseException) -> str:
    if isinstance(exc, FileNotFoundError):
        return f"{path}: vanished between listing and reading"
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text if str(path) in text else f"{path}: {type(exc).__name__}: {text}"


def merge_ranges(ranges: list[RowRange]) -> tuple[RowRange, ...]:
    """Coalesce adjacent one-row ranges of the same file into {file, start_row, end_row}."""
    merged: list[RowRange] = []
    for r in ranges:
        if merged and merged[-1].file == r.file and merged[-1].end_row == r.start_row:
            merged[-1] = RowRange(r.file, merged[-1].start_row, r.end_row)
        else:
            merged.append(r)
    return tuple(merged)


def cursor_after(ranges: tuple[RowRange, ...], previous: Cursor, *, steps: int = 0) -> Cursor:
    """Where a site continues once `ranges` are accepted, `steps` optimizer steps later.
    The schedule's increment phase carries on only while a round ends in the file it began in;
    a round that crossed into a new file leaves that file's phase at 0 for the next round."""
    if not ranges:
        return previous
    start = increment_step(previous, first_file=ranges[0].file)
    same_file = ranges[-1].file == ranges[0].file
    return Cursor(file=ranges[-1].file, row=ranges[-1].end_row,
                  steps=start + steps if same_file else 0, run_steps=previous.run_steps + steps)


def increment_step(cursor: Cursor, *, first_file: str) -> int:
    """Steps already taken in the increment a round begins in (0 when it begins a new file)."""
    return cursor.steps if first_file == cursor.file else 0
