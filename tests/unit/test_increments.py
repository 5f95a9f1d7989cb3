"""Increment readers: Parquet, JSONL and text files, exact cursors across files."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from workers.increments import (IncrementError, increment_files, iter_rows, merge_ranges,
                                read_texts)
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
    assert increment_files(site / "2-b.jsonl") == [site / "2-b.jsonl"]


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
