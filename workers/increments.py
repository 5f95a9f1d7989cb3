"""Increment readers: a site's files, in name order, streamed as text rows.

The format comes from the extension: `.parquet`, `.jsonl`/`.json`, `.txt`. A plain text
file has one row per paragraph (blocks separated by blank lines), so row ranges stay
meaningful for lineage. Files are read in blocks (Parquet row groups, JSON blocks, text
chunks), so a worker's memory does not grow with the size of a file.

Nothing here ever changes a site's files. A file that cannot be used — it does not parse, has
no such text column, is not UTF-8, holds a row over the limit — raises `IncrementError`
(damaged: record it and skip it). A storage fault that may pass (timeouts, resets, throttling,
EIO) is retried, and raises `StorageUnavailable` if it persists (try again later).
"""

from __future__ import annotations

import codecs
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.json as pa_json
import pyarrow.parquet as pq

from workers.retry import READ_ATTEMPTS, READ_BACKOFF_S, StorageUnavailable, is_transient, retrying
from workers.storage import DataFile, data_file, join, list_files, locate, redact
from workers.types import MAX_ROW_CHARS, Cursor, RowRange

FORMATS = {".parquet": "parquet", ".jsonl": "json", ".json": "json", ".txt": "text"}
BLOCK_BYTES = 1 << 20  # read size for text files; Parquet reads by row group
BATCH_ROWS = 1024


class IncrementError(ValueError):
    """An increment file that cannot be read as text rows; names the file and the fix."""


# What a damaged file raises while it is parsed (a transient fault is an OSError instead).
DAMAGE = (IncrementError, UnicodeDecodeError, pa.ArrowInvalid, pa.ArrowTypeError,
          pa.ArrowNotImplementedError, pa.ArrowKeyError)


def increment_files(location: str | Path, *, settle_s: float = 0.0) -> list[DataFile]:
    """The increment files of a site: the file itself, or the folder's files in name order.
    `location` is a local path or a pyarrow filesystem URI (s3://, gs://, hdfs://, file://).
    `settle_s` > 0 (a watched site) leaves out files modified in the last `settle_s` seconds."""
    settled = time.time() - settle_s if settle_s > 0 else None
    return retrying(lambda: list_files(location, suffixes=set(FORMATS), settled_before=settled),
                    what=f"listing {redact(location)}")


def push_increment(location: str | Path, table: pa.Table, *, text_column: str = "text",
                   name: str | None = None) -> str:
    """Add an Arrow table as a new increment of a (watched) site; returns the file's path or
    URI. The file is named by the time of the push (so increments sort in arrival order) and
    written under a hidden temporary name, then moved into place, so no reader sees it half
    written."""
    if table.num_rows == 0:
        raise IncrementError(f"{redact(location)}: empty increment (0 rows); push at least one row")
    if text_column not in table.column_names or not pa.types.is_string(
            table.schema.field(text_column).type):
        raise IncrementError(f"{redact(location)}: the table needs a string column "
                             f"{text_column!r} (found {table.schema}); pass text_column=")
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
    name = name or f"{stamp}-{time.time_ns() % 10**9:09d}-{uuid.uuid4().hex[:8]}.parquet"
    filesystem, folder = locate(location)
    filesystem.create_dir(folder, recursive=True)
    temporary, final = f"{folder}/.{name}.tmp", f"{folder}/{name}"
    pq.write_table(table, temporary, filesystem=filesystem)
    filesystem.move(temporary, final)
    return join(redact(location), name)


def read_texts(path: str | Path | DataFile, *, text_column: str = "text",
               max_row_chars: int = MAX_ROW_CHARS) -> list[str]:
    """All rows' text of one increment file, in row order; IncrementError if unusable."""
    return [text for _, text in read_rows(path, text_column=text_column,
                                          max_row_chars=max_row_chars)]


def read_rows(path: str | Path | DataFile, *, text_column: str = "text",
              max_row_chars: int = MAX_ROW_CHARS, start_row: int = 0
              ) -> Iterator[tuple[int, str]]:
    """(row, text) from `start_row` on, streamed. A transient fault is retried from the row
    it reached; if it persists, a file whose bytes still read in full is damaged
    (IncrementError), otherwise the storage is (StorageUnavailable)."""
    path = data_file(path)
    if FORMATS.get(path.suffix) is None:
        raise IncrementError(f"{path}: unknown extension; use one of {sorted(FORMATS)}")
    next_row, failures = start_row, 0
    while True:
        try:
            for row, text in _stream(path, text_column, max_row_chars, start=next_row):
                yield row, text
                next_row, failures = row + 1, 0
            return
        except DAMAGE as exc:
            raise IncrementError(_describe(path, exc)) from exc
        except OSError as exc:
            if not is_transient(exc):
                raise
            failures += 1
            if failures < READ_ATTEMPTS:
                time.sleep(READ_BACKOFF_S * 2 ** (failures - 1))
                continue
            if _bytes_readable(path):  # the storage answers again: parse once more, and
                if failures == READ_ATTEMPTS:  # only if that fails too, look closer
                    continue
                if _copy_damaged(path, text_column, max_row_chars):
                    raise IncrementError(_describe(path, exc)) from exc
            raise StorageUnavailable(f"{path}: {_describe(path, exc)} (still failing after "
                                     f"{READ_ATTEMPTS} attempts)") from exc


def _copy_damaged(path: DataFile, text_column: str, max_row_chars: int) -> bool:
    """Whether a local copy of the file fails to parse: the bytes read in full while parsing
    them from the storage kept failing (throttled ranged reads do that), and only a copy,
    read from local disk, tells the content's fault from the storage's. The copy goes to a
    temporary file (never to memory), and the site's file is only read."""
    with tempfile.TemporaryDirectory(prefix="tributary-check-") as folder:
        local = Path(folder) / path.name
        try:
            with path.open() as stream, local.open("wb") as out:
                while chunk := stream.read(1 << 20):
                    out.write(chunk)
        except OSError:
            return False  # the storage failed again: not the content's fault
        copy = DataFile(pafs.LocalFileSystem(), str(local), str(path))
        try:
            for _ in _stream(copy, text_column, max_row_chars, start=0):
                pass
        except (*DAMAGE, OSError):
            return True
        return False


def _bytes_readable(path: DataFile) -> bool:
    try:
        path.sha256()
        return True
    except OSError:
        return False


def _stream(path: DataFile, text_column: str, max_row_chars: int, *, start: int
            ) -> Iterator[tuple[int, str]]:
    if path.size() == 0:
        raise IncrementError(f"{path}: empty file (0 bytes); remove it or write its rows")
    kind = FORMATS[path.suffix]
    if kind == "text":
        rows = _text_rows(path, max_row_chars)
    elif kind == "parquet":
        rows = _parquet_rows(path, text_column, start=start)
    else:
        rows = _json_rows(path, text_column, max_row_chars)
    for row, text in rows:
        if row < start:
            continue
        if len(text) > max_row_chars:
            raise _too_long(path, row, len(text), max_row_chars)
        yield row, text


def _too_long(path: DataFile, row: int, size: int, limit: int, *, unit: str = "characters",
              more: str = "") -> IncrementError:
    return IncrementError(f"{path}: row {row} has {more}{size:,} {unit}, over "
                          f"worker.max_row_chars={limit:,}; split the row or raise the limit")


def _parquet_rows(path: DataFile, text_column: str, *, start: int) -> Iterator[tuple[int, str]]:
    """Row group by row group; groups wholly before `start` are not read at all."""
    with path.open_random() as handle:
        parquet = pq.ParquetFile(handle)
        _check_column(path, parquet.schema_arrow, text_column)
        row = 0
        for group in range(parquet.num_row_groups):
            count = parquet.metadata.row_group(group).num_rows
            if row + count <= start:
                row += count
                continue
            for batch in parquet.iter_batches(batch_size=BATCH_ROWS, row_groups=[group],
                                              columns=[text_column]):
                for text in batch.column(0).to_pylist():
                    yield row, text or ""
                    row += 1


def _json_rows(path: DataFile, text_column: str, max_row_chars: int
               ) -> Iterator[tuple[int, str]]:
    """JSON Lines, parsed by Arrow a block of whole lines at a time (Arrow's own streaming
    JSON reader reads ahead without bound). A line may be as long as the row limit allows
    (UTF-8 needs at most 4 bytes a character, plus the other fields)."""
    longest = 4 * max_row_chars + (1 << 16)
    pending, row = b"", 0
    with path.open() as stream:
        while True:
            chunk = stream.read(BLOCK_BYTES)
            data = pending + chunk
            cut = data.rfind(b"\n") + 1 if chunk else len(data)
            block, pending = data[:cut], data[cut:]
            if len(pending) > longest:
                raise _too_long(path, row, len(pending), max_row_chars, unit="bytes",
                                more="more than ")
            if block.strip():
                options = pa_json.ReadOptions(block_size=len(block) + 1, use_threads=False)
                table = pa_json.read_json(pa.BufferReader(block), read_options=options)
                _check_column(path, table.schema, text_column)
                for text in table.column(text_column).to_pylist():
                    yield row, text or ""
                    row += 1
            if not chunk:
                return


def _check_column(path: DataFile, schema: pa.Schema, text_column: str) -> None:
    if text_column not in schema.names:
        raise IncrementError(
            f"{path}: no column {text_column!r} (found {schema.names}); "
            "set the site's text_column to the column holding the text")
    kind = schema.field(text_column).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_null(kind)):
        raise IncrementError(f"{path}: column {text_column!r} is {kind}, expected strings")


def _text_rows(path: DataFile, max_row_chars: int) -> Iterator[tuple[int, str]]:
    """Paragraphs (blocks between blank lines), decoded as UTF-8 chunk by chunk. Splitting the
    text read so far at "\\n\\n" and keeping the last piece back gives the same paragraphs as
    splitting the whole file: the scan runs left to right and never looks back."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    pending, row, offset = "", 0, 0
    with path.open() as stream:
        while True:
            chunk = stream.read(BLOCK_BYTES)
            try:
                pending += decoder.decode(chunk, final=not chunk)
            except UnicodeDecodeError as exc:
                raise IncrementError(f"{path}: not UTF-8 text (byte {offset + exc.start}); "
                                     "re-encode the file as UTF-8") from exc
            offset += len(chunk)
            *complete, pending = pending.split("\n\n")
            if not chunk:
                complete.append(pending)
            for block in complete:
                text = block.strip("\n")
                if text.strip():
                    yield row, text
                    row += 1
            if not chunk:
                return
            if len(pending) > 2 * max_row_chars + 2:  # no paragraph break in sight
                raise _too_long(path, row, len(pending), max_row_chars, more="more than ")


def _describe(path: DataFile, exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if "straddl" in text:  # pyarrow's words for a JSON line longer than its read block
        text = ("a JSON line is longer than the read block, so a row is over "
                "worker.max_row_chars; split the row or raise the limit")
    return text if str(path) in text else f"{path}: {type(exc).__name__}: {text}"


def iter_rows(
    files: list[DataFile], cursor: Cursor, *, text_column: str,
    max_row_chars: int = MAX_ROW_CHARS, skip: frozenset[str] | set[str] = frozenset(),
    on_bad_file: Callable[[DataFile, str], None] | None = None,
) -> Iterator[tuple[RowRange, str]]:
    """Yield (one-row range, text) from the cursor's row onwards, across files in name order.

    Files named in `skip` (recorded as damaged earlier) are not read. A damaged file is passed
    to `on_bad_file(path, reason)` and skipped (without the callback, the error propagates);
    rows of it yielded before the damage showed stay yielded. A file that vanished since the
    listing is skipped. StorageUnavailable propagates: the caller tries again later."""
    names = [f.name for f in files]
    start_index, start_row = 0, 0
    if cursor.file is not None:
        # Files sort by name, so a cursor file that is gone still has a well-defined place.
        start_index = sum(1 for name in names if name < cursor.file)
        if start_index < len(names) and names[start_index] == cursor.file:
            start_row = cursor.row
    for index in range(start_index, len(files)):
        file = files[index]
        if file.name in skip:
            continue
        first = start_row if index == start_index else 0
        try:
            for row, text in read_rows(file, text_column=text_column,
                                       max_row_chars=max_row_chars, start_row=first):
                yield RowRange(file.name, row, row + 1), text
        except FileNotFoundError:
            continue  # gone since the listing: nothing of it to train
        except IncrementError as exc:
            if on_bad_file is None:
                raise
            on_bad_file(file, str(exc))


def merge_ranges(ranges: list[RowRange]) -> tuple[RowRange, ...]:
    """Coalesce adjacent ranges of the same file into {file, start_row, end_row} (keeping a
    token offset where the first range starts, or the last one ends, inside a row)."""
    merged: list[RowRange] = []
    for r in ranges:
        last = merged[-1] if merged else None
        if (last is not None and last.file == r.file and last.end_row == r.start_row
                and last.end_token is None and r.start_token is None):
            merged[-1] = RowRange(r.file, last.start_row, r.end_row,
                                  start_token=last.start_token, end_token=r.end_token)
        else:
            merged.append(r)
    return tuple(merged)


def cursor_after(ranges: tuple[RowRange, ...], previous: Cursor, *, steps: int = 0) -> Cursor:
    """Where a site continues once `ranges` are accepted, `steps` optimizer steps later: after
    the last range, inside its last row if it ended there. The schedule's increment phase
    carries on only while a round ends in the file it began in; a round that crossed into a
    new file leaves that file's phase at 0 for the next round."""
    if not ranges:
        return previous
    start = increment_step(previous, first_file=ranges[0].file)
    last = ranges[-1]
    same_file = last.file == ranges[0].file
    row, token = ((last.end_row, 0) if last.end_token is None
                  else (last.end_row - 1, last.end_token))
    return Cursor(file=last.file, row=row, token=token,
                  steps=start + steps if same_file else 0, run_steps=previous.run_steps + steps)


def increment_step(cursor: Cursor, *, first_file: str) -> int:
    """Steps already taken in the increment a round begins in (0 when it begins a new file)."""
    return cursor.steps if first_file == cursor.file else 0
