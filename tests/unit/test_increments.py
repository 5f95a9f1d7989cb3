"""Increment readers: Parquet, JSONL and text files, exact cursors across files."""

import json
import re

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from workers.increments import (
    READ_ERRORS,
    IncrementError,
    increment_files,
    iter_rows,
    merge_ranges,
    read_texts,
)
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
    with pytest.raises(READ_ERRORS, match=re.escape(message)) as caught:
        read_texts(bad_files / name)
    assert name in str(caught.value)


def test_bad_files_are_reported_and_skipped_not_fatal(bad_files):
    files = increment_files(bad_files)
    (bad_files / "08-gone.jsonl").write_text('{"text": "soon gone"}\n')
    files = increment_files(bad_files)
    (bad_files / "08-gone.jsonl").unlink()  # vanishes between listing and reading
    bad = []
    rows = list(iter_rows(files, Cursor(), text_column="text",
                          on_bad_file=lambda path, reason: bad.append((path.name, reason))))
    assert [text for _, text in rows] == ["fine"]
    assert [name for name, _ in bad] == ["01-corrupt.parquet", "02-empty.jsonl",
                                         "03-nocolumn.jsonl", "04-numbers.parquet",
                                         "05-latin1.txt", "06-huge.jsonl", "08-gone.jsonl"]
    assert "vanished between listing and reading" in bad[-1][1]


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
