"""Packing: every token lands in exactly one fixed-length sequence; pads are masked."""

import numpy as np

from workers.packing import batch_tensors, pack, real_tokens, to_arrays


def test_pack_keeps_every_token_once():
    docs = [[1, 2, 3], [4, 5], [6, 7, 8, 9, 10]]
    table = pack(docs, seq_len=4, eos_id=0, pad_id=99)
    ids, lengths = to_arrays(table)
    stream = [1, 2, 3, 0, 4, 5, 0, 6, 7, 8, 9, 10, 0]
    assert ids.shape == (4, 4)
    assert ids.reshape(-1)[: len(stream)].tolist() == stream
    assert lengths.tolist() == [4, 4, 4, 1] and real_tokens(table) == len(stream)


def test_pads_are_out_of_attention_and_loss():
    batch = batch_tensors(np.array([[5, 6, 99, 99]]), np.array([2]))
    assert batch["attention_mask"].tolist() == [[1, 1, 0, 0]]
    assert batch["labels"].tolist() == [[5, 6, -100, -100]]
