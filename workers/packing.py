"""Tokenize text rows and pack them into fixed-length sequences, held as Arrow tables.

Rows are joined with the tokenizer's EOS token and cut into `seq_len` pieces; the last
piece is right-padded. A long row may be split between rounds: the worker then packs the part
of the row's tokens (and its EOS) that the round takes. Each table has `input_ids` (list<int32>, always `seq_len` long) and
`length` (the number of real, non-pad tokens), so token counts are exact.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import torch

SEQUENCE_SCHEMA = pa.schema([("input_ids", pa.list_(pa.int32())), ("length", pa.int32())])


def tokenize(tokenizer, texts: list[str]) -> list[list[int]]:
    if not texts:
        return []
    return tokenizer(texts, add_special_tokens=False)["input_ids"]


def pack(token_lists: list[list[int]], *, seq_len: int, eos_id: int, pad_id: int) -> pa.Table:
    """Concatenate documents with EOS after each and cut into seq_len sequences."""
    stream: list[int] = []
    for ids in token_lists:
        stream.extend(ids)
        stream.append(eos_id)
    return pack_stream(stream, seq_len=seq_len, pad_id=pad_id)


def pack_stream(stream: list[int], *, seq_len: int, pad_id: int) -> pa.Table:
    """Cut a token stream (documents already joined by EOS) into seq_len sequences; the last
    one is right-padded."""
    if not stream:
        return empty_sequences()
    count = -(-len(stream) // seq_len)
    padded = np.full(count * seq_len, pad_id, dtype=np.int32)
    padded[: len(stream)] = stream
    lengths = np.full(count, seq_len, dtype=np.int32)
    lengths[-1] = len(stream) - (count - 1) * seq_len
    return sequences_table(padded.reshape(count, seq_len), lengths)


def sequences_table(ids: np.ndarray, lengths: np.ndarray) -> pa.Table:
    flat = pa.array(ids.reshape(-1), type=pa.int32())
    offsets = pa.array(np.arange(0, ids.size + 1, ids.shape[1], dtype=np.int32))
    return pa.table({"input_ids": pa.ListArray.from_arrays(offsets, flat),
                     "length": pa.array(lengths, type=pa.int32())}, schema=SEQUENCE_SCHEMA)


def empty_sequences() -> pa.Table:
    return SEQUENCE_SCHEMA.empty_table()


def to_arrays(table: pa.Table) -> tuple[np.ndarray, np.ndarray]:
    """(ids [N, L] int64, lengths [N]) from a sequence table."""
    if table.num_rows == 0:
        return np.zeros((0, 0), dtype=np.int64), np.zeros(0, dtype=np.int64)
    column = table.column("input_ids").combine_chunks()
    flat = column.values.to_numpy(zero_copy_only=False)
    ids = flat.reshape(table.num_rows, -1).astype(np.int64)
    return ids, table.column("length").to_numpy().astype(np.int64)


def batch_tensors(ids: np.ndarray, lengths: np.ndarray) -> dict[str, torch.Tensor]:
    """Model inputs: pads are masked out of attention and of the loss (label -100)."""
    input_ids = torch.from_numpy(ids)
    positions = torch.arange(ids.shape[1]).unsqueeze(0)
    mask = positions < torch.from_numpy(lengths).unsqueeze(1)
    labels = input_ids.masked_fill(~mask, -100)
    return {"input_ids": input_ids, "attention_mask": mask.long(), "labels": labels}


def real_tokens(table: pa.Table) -> int:
    return int(np.asarray(table.column("length")).sum()) if table.num_rows else 0
