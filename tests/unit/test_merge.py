"""trainer.merge.weighted_average: values checked by hand, and every documented error."""

import pytest
import torch

from trainer.merge import apply_delta, weighted_average


def state(a, b):
    return {"w": torch.tensor(a, dtype=torch.float32), "b": torch.tensor(b, dtype=torch.float32)}


def test_weighted_average_matches_hand_computed_values():
    updates = [(state([[1.0, 2.0]], [3.0]), 1.0), (state([[4.0, 8.0]], [0.0]), 3.0)]
    merged = weighted_average(updates)
    # (1·1 + 3·4)/4 = 3.25, (1·2 + 3·8)/4 = 6.5, (1·3 + 3·0)/4 = 0.75
    assert torch.equal(merged["w"], torch.tensor([[3.25, 6.5]]))
    assert torch.equal(merged["b"], torch.tensor([0.75]))


def test_accumulates_in_fp32_from_bf16_input():
    big = {"x": torch.full((4,), 256.0, dtype=torch.bfloat16)}
    small = {"x": torch.full((4,), 1.0, dtype=torch.bfloat16)}
    merged = weighted_average([(big, 1.0), (small, 1.0)])
    assert merged["x"].dtype == torch.float32
    assert torch.equal(merged["x"], torch.full((4,), 128.5))  # 128.5 is not a bf16 value


def test_writes_into_preallocated_out():
    out = {"w": torch.zeros(1, 2), "b": torch.zeros(1)}
    pointers = {k: v.data_ptr() for k, v in out.items()}
    result = weighted_average([(state([[2.0, 2.0]], [1.0]), 2.0)], out=out)
    assert torch.equal(out["w"], torch.tensor([[2.0, 2.0]]))
    assert all(result[k].data_ptr() == pointers[k] for k in out)


@pytest.mark.parametrize("updates, message", [
    ([], "no updates"),
    ([(state([[1.0, 1.0]], [1.0]), 1.0), ({"w": torch.zeros(1, 2)}, 1.0)], "wrong tensors"),
    ([(state([[1.0, 1.0]], [1.0]), 1.0), (state([[1.0, 1.0, 1.0]], [1.0]), 1.0)], "shape"),
    ([(state([[1.0, 1.0]], [1.0]), 0.0)], "positive total"),
    ([(state([[1.0, 1.0]], [1.0]), -1.0), (state([[1.0, 1.0]], [1.0]), 2.0)], ">= 0"),
    ([(state([[float("nan"), 1.0]], [1.0]), 1.0)], "input tensor 'w' holds NaN or Inf"),
    ([(state([[float("inf"), 1.0]], [1.0]), 1.0)], "input tensor 'w' holds NaN or Inf"),
    ([(state([[1.0, 1.0]], [1.0]), float("nan"))], "non-finite weight"),
])
def test_rejects_bad_updates(updates, message):
    with pytest.raises(ValueError, match=message):
        weighted_average(updates)


def test_rejects_out_of_another_shape():
    with pytest.raises(ValueError, match="out"):
        weighted_average([(state([[1.0, 1.0]], [1.0]), 1.0)],
                         out={"w": torch.zeros(2, 2), "b": torch.zeros(1)})


def test_apply_delta_is_the_outer_step():
    params = {"w": torch.tensor([1.0, 2.0])}
    apply_delta(params, {"w": torch.tensor([0.5, -1.0])})
    assert torch.equal(params["w"], torch.tensor([1.5, 1.0]))


@pytest.mark.parametrize("count", [2, 5, 8])
def test_blocked_merges_equal_whole_tensor_references_across_block_edges(monkeypatch, count):
    """Blocks of 7 elements over tensors of 50 and 3: every edge case of the block loop."""
    from trainer import merge

    monkeypatch.setattr(merge, "MERGE_BLOCK", 7)
    monkeypatch.setattr(merge, "ROBUST_BLOCK", 7)
    generator = torch.Generator().manual_seed(count)
    updates = [({"a": torch.randn(5, 10, generator=generator),
                 "b": torch.randn(3, generator=generator)}, float(i + 1)) for i in range(count)]
    total = sum(w for _, w in updates)
    for key in ("a", "b"):
        stacked = torch.stack([s[key] for s, _ in updates])
        expected = sum(s[key] * (w / total) for s, w in updates)
        torch.testing.assert_close(merge.weighted_average(updates)[key], expected)
        cut = min(int(0.2 * count), (count - 1) // 2)
        trimmed = stacked.sort(dim=0).values[cut:count - cut].mean(dim=0)
        torch.testing.assert_close(merge.trimmed_mean(updates, trim_fraction=0.2)[key], trimmed)
        torch.testing.assert_close(merge.median(updates)[key], stacked.quantile(0.5, dim=0))
