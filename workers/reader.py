"""A round's new data: the next `tokens` tokens of a site's increments from its cursor on,
packed into sequences, with the exact rows (and token offsets) they came from.

A row that does not fit the round is split; the next round continues at its next token (its
tokens are kept, so the row is not tokenized again). Damaged files are recorded and skipped;
a storage fault that persists raises StorageUnavailable (the caller sits the round out).
"""

from __future__ import annotations

import bisect
import dataclasses
import logging
from collections.abc import Callable

import pyarrow as pa

from workers.increments import increment_files, iter_rows
from workers.packing import pack_stream
from workers.replay import with_strata
from workers.storage import DataFile
from workers.types import Cursor, RowRange, SiteConfig

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class NewRows:
    """What a round read: the rows consumed (one range per row, in order), their sequences,
    and the damaged files met on the way."""

    ranges: list[RowRange]
    sequences: pa.Table
    damaged: list[dict]


class RowReader:
    def __init__(self, *, site: SiteConfig, tokenizer, seq_len: int, max_row_chars: int,
                 stratum: Callable[[str], str] = lambda file: file) -> None:
        self.site, self.tokenizer = site, tokenizer
        self.seq_len, self.max_row_chars = seq_len, max_row_chars
        self.stratum = stratum  # the replay stratum of a file's sequences
        # The last row a round stopped inside, tokenized: the next round continues it.
        self.open_row: tuple[str, int, list[int]] | None = None

    def read(self, cursor: Cursor, *, tokens: int, skip: frozenset[str]) -> NewRows:
        """Exactly `tokens` tokens from the cursor on (fewer only when the site runs out)."""
        damaged: list[dict] = []
        stream: list[int] = []
        ranges, starts = [], []  # starts: (offset in the stream, file) of each row's tokens
        rows = iter_rows(self._files(skip, damaged), cursor, text_column=self.site.text_column,
                         max_row_chars=self.max_row_chars, skip=skip,
                         on_bad_file=lambda path, why: damaged.append(self._record(path, why)))
        for row_range, text in rows:
            if len(stream) >= tokens:
                break
            if not text.strip():  # a blank row is consumed, but adds no tokens
                ranges.append(row_range)
                continue
            ids = self._row_tokens(row_range, text)
            start = cursor.token if (row_range.file, row_range.start_row) == (
                cursor.file, cursor.row) else 0
            end = min(len(ids), start + tokens - len(stream))
            starts.append((len(stream), row_range.file))
            stream.extend(ids[start:end])
            ranges.append(dataclasses.replace(row_range, start_token=start or None,
                                              end_token=end if end < len(ids) else None))
            self.open_row = (row_range.file, row_range.start_row, ids) if end < len(ids) else None
        tok = self.tokenizer
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        sequences = pack_stream(stream, seq_len=self.seq_len, pad_id=pad)
        return NewRows(ranges, with_strata(sequences, self._strata(starts, sequences.num_rows)),
                       damaged)

    def _strata(self, starts: list[tuple[int, str]], count: int) -> list[str]:
        """Each sequence's stratum: that of the file its first token came from."""
        offsets = [offset for offset, _ in starts]
        return [self.stratum(starts[bisect.bisect_right(offsets, i * self.seq_len) - 1][1])
                for i in range(count)]

    def _files(self, skip: frozenset[str], damaged: list[dict]) -> list[DataFile]:
        """The site's files; one that is a link leading out of the site's folder is refused
        (recorded like a damaged file): a site trains on its own files only."""
        files = increment_files(self.site.path, settle_s=self.site.settle_window)
        refused = set()
        for file in files:
            if file.name not in skip and file.escapes(self.site.path):
                damaged.append(self._record(file, f"{file}: a symbolic link that leads out of "
                                                  "the site's folder; copy the file in instead"))
                refused.add(file.name)
        return [f for f in files if f.name not in refused]

    def _row_tokens(self, row_range: RowRange, text: str) -> list[int]:
        """The row's tokens and its EOS separator."""
        if self.open_row is not None and self.open_row[:2] == (row_range.file,
                                                                  row_range.start_row):
            return self.open_row[2]
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return [*ids, self.tokenizer.eos_token_id]

    def _record(self, path: DataFile, reason: str) -> dict:
        """A damaged file's record: enough to find the very file later. It is skipped, never
        moved or changed."""
        log.error("site %s: %s; skipping the file (it stays where it is)", self.site.name,
                  reason)
        entry = {"site": self.site.name, "file": str(path), "name": path.name,
                 "reason": reason, "size": None, "mtime": None, "sha256": None}
        try:
            info = path.info()
            entry["size"] = info.size
            entry["mtime"] = info.mtime.timestamp() if info.mtime else None
            entry["sha256"] = path.sha256()
        except OSError:
            pass  # unreadable bytes: recorded without their digest
        return entry
