"""Increment readers: Parquet, JSONL and text files streamed, exact cursors across files,
damaged files named and left untouched."""

import errno
import hashlib
import io
import json
import random
import re

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from workers.increments import (
    IncrementError,
    cursor_after,
    increment_files,
    iter_rows,
    merge_ranges,
    read_rows,
    read_texts,
)
from workers.storage import DataFile
from workers.types import Cursor, RowRange


@pytest.fixture
def site(tmp_path):
    pq.write_table(pa.table({"body": ["a0", "a1", "a2"]}), tmp_path / "1-a.parquet")
    (tmp_path / "2-b.jsonl").write_text("\n".join(json.dumps({"body": f"b{i}"}) for i in range(2)))
    (tmp_path / "3-c.txt").write_text("c0 line\nstill c0\n\n\nc1\n")
    (tmp_path / "notes.md").write_text("not an increment")
    return tmp_path


def test_files_in_name_order_by_extension(site):
    assert [p.name for p in increment_files(site)] == ["1-a.parquet", "2-b.jsonl", "3-c.txt"]
    assert [str(f) for f in increment_files(site / "2-b.jsonl")] == [str(site / "2-b.jsonl")]


def test_each_format_reads_rows(site):
    assert read_texts(site / "1-a.parquet", text_column="body") == ["a0", "a1", "a2"]
    assert read_texts(site / "2-b.jsonl", text_column="body") == ["b0", "b1"]
    assert read_texts(site / "3-c.txt") == ["c0 line\nstill c0", "c1"]


def test_missing_text_column_names_the_file_and_the_fix(site):
    with pytest.raises(IncrementError, match=r"1-a.parquet: no column 'text'.*text_column"):
        read_texts(site / "1-a.parquet", text_column="text")


def test_cursor_continues_exactly_across_files(site):
    files = increment_files(site)
    rows = list(iter_rows(files, Cursor("1-a.parquet", 2), text_column="body"))
    assert [text for _, text in rows[:3]] == ["a2", "b0", "b1"]
    assert rows[0][0] == RowRange("1-a.parquet", 2, 3)
    finished = list(iter_rows(files[:2], Cursor("2-b.jsonl", 2), text_column="body"))
    assert finished == []


def test_ranges_coalesce_per_file():
    ranges = [RowRange("a", 2, 3), RowRange("a", 3, 4), RowRange("b", 0, 1)]
    assert merge_ranges(ranges) == (RowRange("a", 2, 4), RowRange("b", 0, 1))


@pytest.fixture
def bad_files(tmp_path):
    """One file per kind of damage a site folder sees in practice."""
    (tmp_path / "01-corrupt.parquet").write_bytes(b"PAR1 this is not parquet at all")
    (tmp_path / "02-empty.jsonl").write_bytes(b"")
    (tmp_path / "03-nocolumn.jsonl").write_text('{"other": "x"}\n')
    pq.write_table(pa.table({"text": [1, 2]}), tmp_path / "04-numbers.parquet")
    (tmp_path / "05-latin1.txt").write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    (tmp_path / "06-huge.jsonl").write_text(json.dumps({"text": "x" * 2_000_000}) + "\n")
    (tmp_path / "07-good.jsonl").write_text('{"text": "fine"}\n')
    return tmp_path


@pytest.mark.parametrize("name, message", [
    ("01-corrupt.parquet", "01-corrupt.parquet"),
    ("02-empty.jsonl", "empty file (0 bytes)"),
    ("03-nocolumn.jsonl", "no column 'text'"),
    ("04-numbers.parquet", "expected strings"),
    ("05-latin1.txt", "not UTF-8 text (byte 3)"),
    ("06-huge.jsonl", "row 0 has 2,000,000 characters, over worker.max_row_chars"),
])
def test_each_damaged_file_gets_an_error_naming_it(bad_files, name, message):
    with pytest.raises(IncrementError, match=re.escape(message)) as caught:
        read_texts(bad_files / name)
    assert name in str(caught.value)


def digests(folder) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.iterdir()}


def test_bad_files_are_reported_and_skipped_and_never_touched(bad_files):
    (bad_files / "08-gone.jsonl").write_text('{"text": "soon gone"}\n')
    files = increment_files(bad_files)
    (bad_files / "08-gone.jsonl").unlink()  # vanishes between listing and reading
    before = digests(bad_files)
    bad = []
    rows = list(iter_rows(files, Cursor(), text_column="text",
                          on_bad_file=lambda path, reason: bad.append((path.name, reason))))
    assert [text for _, text in rows] == ["fine"]
    assert [name for name, _ in bad] == ["01-corrupt.parquet", "02-empty.jsonl",
                                         "03-nocolumn.jsonl", "04-numbers.parquet",
                                         "05-latin1.txt", "06-huge.jsonl"]
    assert digests(bad_files) == before  # nothing moved, renamed, deleted or rewritten
    skipped = list(iter_rows(files, Cursor(), text_column="text",
                             skip={name for name, _ in bad}))  # recorded files: not read again
    assert [text for _, text in skipped] == ["fine"]


def test_a_file_damaged_part_way_yields_its_good_rows_first(tmp_path):
    """JSON is parsed a block (here 1 MB) at a time: rows of the blocks before the damage
    come out, then the file is reported."""
    lines = [json.dumps({"text": f"row {i} " + "x" * 100}) for i in range(15_000)]
    (tmp_path / "a.jsonl").write_text("\n".join([*lines, '{"text": broken']) + "\n")
    bad = []
    rows = list(iter_rows(increment_files(tmp_path), Cursor(), text_column="text",
                          max_row_chars=1000, on_bad_file=lambda path, reason: bad.append(reason)))
    assert 0 < len(rows) < 15_000
    assert [text for _, text in rows] == [json.loads(line)["text"] for line in lines[:len(rows)]]
    assert len(bad) == 1 and "a.jsonl" in bad[0]


def test_text_paragraphs_streamed_equal_the_whole_file_split(tmp_path, monkeypatch):
    """Chunked reading (here 7-byte chunks) gives the paragraphs of splitting the whole file
    at blank lines, whatever falls on a chunk boundary, multi-byte characters included."""
    from workers import increments

    monkeypatch.setattr(increments, "BLOCK_BYTES", 7)
    rng = random.Random(0)
    for trial in range(40):
        text = "".join(rng.choice(["a", "b", "\n", "\n\n", " ", "é", "€"])
                       for _ in range(rng.randint(0, 80)))
        path = tmp_path / f"t{trial}.txt"
        path.write_text(text, encoding="utf-8")
        blocks = [b.strip("\n") for b in text.split("\n\n")]
        expected = [b for b in blocks if b.strip()]
        if not text:
            continue
        assert read_texts(path) == expected, repr(text)


def test_reading_starts_at_the_cursor_row_without_the_rows_before(tmp_path):
    table = pa.table({"text": [f"row {i}" for i in range(10_000)]})
    pq.write_table(table, tmp_path / "big.parquet", row_group_size=1000)
    rows = read_rows(tmp_path / "big.parquet", start_row=8_500)
    assert next(rows) == (8_500, "row 8500")
    assert [row for row, _ in rows][-1] == 9_999


@pytest.mark.parametrize("kind", ["parquet", "jsonl", "txt"])
def test_memory_does_not_grow_with_the_file(tmp_path, kind):
    """A ~48 MB increment is streamed: the reader never holds more than a few blocks (a whole
    read would hold the file, and its decoded text, at once). Uncompressed, so the file is as
    large as its text."""
    import tracemalloc

    row = "word " * 200
    count = 48_000
    path = tmp_path / f"big.{kind}"
    if kind == "parquet":
        pq.write_table(pa.table({"text": [row] * count}), path, row_group_size=2000,
                       compression="none", use_dictionary=False)
    elif kind == "jsonl":
        path.write_text((json.dumps({"text": row}) + "\n") * count)
    else:
        path.write_text((row + "\n\n") * count)
    size = path.stat().st_size
    arrow_peak, seen = 0, 0
    tracemalloc.start()
    for _, text in read_rows(path):
        seen += 1
        if seen % 1000 == 0:
            arrow_peak = max(arrow_peak, pa.total_allocated_bytes())
    python_peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert seen == count
    assert arrow_peak + python_peak < size / 4, (arrow_peak, python_peak, size)


def test_token_ranges_coalesce_and_the_cursor_stops_inside_a_row():
    ranges = [RowRange("a", 2, 3, start_token=40), RowRange("a", 3, 4), RowRange("a", 4, 5,
                                                                               end_token=17)]
    merged = merge_ranges(ranges)
    assert merged == (RowRange("a", 2, 5, start_token=40, end_token=17),)
    assert merged[0].to_dict() == {"file": "a", "start_row": 2, "end_row": 5,
                                   "start_token": 40, "end_token": 17}
    cursor = cursor_after(merged, Cursor("a", 2, token=40), steps=4)
    assert (cursor.file, cursor.row, cursor.token) == ("a", 4, 17)
    whole = cursor_after((RowRange("a", 4, 6, start_token=17),), cursor, steps=1)
    assert (whole.row, whole.token) == (6, 0)


def test_a_uri_site_reads_through_its_pyarrow_filesystem(site):
    """file:// goes through pyarrow's filesystem layer, the same calls as s3://, gs:// or
    hdfs:// (which cannot be reached from the test machines)."""
    uri = f"file://{site}"
    files = increment_files(uri)
    assert [str(f) for f in files] == [f"{uri}/1-a.parquet", f"{uri}/2-b.jsonl", f"{uri}/3-c.txt"]
    rows = list(iter_rows(files, Cursor("1-a.parquet", 2), text_column="body"))
    assert [text for _, text in rows] == ["a2", "b0", "b1", "c0 line\nstill c0", "c1"]
    with pytest.raises(FileNotFoundError, match="no such file or folder"):
        increment_files(f"file://{site}/missing")


def test_a_watched_site_skips_files_still_being_written(site):
    import os
    import time

    old = time.time() - 60
    for path in site.iterdir():
        os.utime(path, (old, old))
    (site / "4-d.txt").write_text("just landed\n")  # modified now: maybe still growing
    (site / ".5-e.parquet.tmp").write_text("hidden: an upload in progress")
    assert [f.name for f in increment_files(site, settle_s=30)] == [
        "1-a.parquet", "2-b.jsonl", "3-c.txt"]
    assert [f.name for f in increment_files(site)][-1] == "4-d.txt"


class FlakyHandler(pafs.FileSystemHandler):
    """A fault injector (storage faults cannot be produced on a local disk on demand): the
    local filesystem, read-only, whose reads fail with EIO `failures` times before they work."""

    def __init__(self, failures: int) -> None:
        self.local, self.failures = pafs.LocalFileSystem(), failures

    def _maybe_fail(self) -> None:
        if self.failures > 0:
            self.failures -= 1
            raise OSError(errno.EIO, "Input/output error (injected)")

    def get_type_name(self):
        return "flaky"

    def normalize_path(self, path):
        return path

    def get_file_info(self, paths):
        return self.local.get_file_info(paths)

    def get_file_info_selector(self, selector):
        return self.local.get_file_info(selector)

    def open_input_stream(self, path):
        self._maybe_fail()
        return self.local.open_input_stream(path)

    def open_input_file(self, path):
        self._maybe_fail()
        return self.local.open_input_file(path)

    def _read_only(self, *args):
        raise PermissionError("a site's storage is read-only")

    create_dir = delete_dir = delete_dir_contents = delete_root_dir_contents = _read_only
    delete_file = move = copy_file = open_output_stream = open_append_stream = _read_only


def flaky_file(tmp_path, failures: int) -> DataFile:
    (tmp_path / "a.jsonl").write_text('{"text": "one"}\n{"text": "two"}\n')
    filesystem = pafs.PyFileSystem(FlakyHandler(failures))
    return DataFile(filesystem, str(tmp_path / "a.jsonl"), "flaky://a.jsonl")


def test_a_transient_fault_is_retried_and_the_file_read(tmp_path, monkeypatch):
    from workers import increments

    monkeypatch.setattr(increments, "READ_BACKOFF_S", 0.01)
    assert [t for _, t in read_rows(flaky_file(tmp_path, failures=2))] == ["one", "two"]


def test_a_fault_that_passes_just_as_the_attempts_run_out_is_not_damage(tmp_path, monkeypatch):
    """The storage answers again on the byte check after the last attempt: the file is
    parsed once more (and read), not recorded as damaged."""
    from workers import increments

    monkeypatch.setattr(increments, "READ_BACKOFF_S", 0.01)
    assert [t for _, t in read_rows(flaky_file(tmp_path, failures=3))] == ["one", "two"]


def test_a_fault_that_persists_is_the_storage_not_the_file(tmp_path, monkeypatch):
    from workers import increments
    from workers.retry import StorageUnavailable

    monkeypatch.setattr(increments, "READ_BACKOFF_S", 0.01)
    bad = []
    with pytest.raises(StorageUnavailable, match="still failing after 3 attempts"):
        list(iter_rows([flaky_file(tmp_path, failures=100)], Cursor(), text_column="text",
                       on_bad_file=lambda path, reason: bad.append(reason)))
    assert bad == []  # never recorded as damaged: it is read again in a later round


def test_a_truncated_parquet_file_is_damaged_not_transient(tmp_path):
    pq.write_table(pa.table({"text": ["row"] * 1000}), tmp_path / "whole.parquet")
    data = (tmp_path / "whole.parquet").read_bytes()
    (tmp_path / "cut.parquet").write_bytes(data[: len(data) // 2])  # an interrupted upload
    with pytest.raises(IncrementError, match="cut.parquet"):
        read_texts(tmp_path / "cut.parquet")


class ThrottledRanges(FlakyHandler):
    """A fault injector: whole-file streams read fine, but random-access reads (Parquet's
    ranged reads) are throttled with EIO `failures` times, as a busy object store does."""

    def open_input_stream(self, path):
        return self.local.open_input_stream(path)

    def open_input_file(self, path):
        handler = self

        class Reads(io.FileIO):
            def read(self, size=-1):
                handler._maybe_fail()
                return super().read(size)

        return pa.PythonFile(Reads(path, "r"), mode="r")


@pytest.mark.parametrize("failures", [5, 1000])
def test_throttled_ranged_reads_never_count_as_damage(tmp_path, monkeypatch, failures):
    from workers import increments
    from workers.retry import StorageUnavailable

    monkeypatch.setattr(increments, "READ_BACKOFF_S", 0.001)
    pq.write_table(pa.table({"text": [f"row {i}" for i in range(50)]}), tmp_path / "a.parquet")
    handler = ThrottledRanges(failures)
    file = DataFile(pafs.PyFileSystem(handler), str(tmp_path / "a.parquet"), "flaky://a.parquet")
    bad = []
    with pytest.raises(StorageUnavailable, match="a.parquet"):
        list(iter_rows([file], Cursor(), text_column="text",
                       on_bad_file=lambda path, reason: bad.append(reason)))
    assert bad == []  # the storage's fault: read again in a later round, never quarantined
    handler.failures = 0  # the storage recovers: every row is there
    assert len(list(read_rows(file))) == 50
