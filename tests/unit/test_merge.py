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

    monkeypatch.setattr(merge, "_native", None)  # the torch block path, not the one-pass kernel
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


# The one-pass kernel (trainer/_weighted_sum.c) that weighted_average uses for fp32 CPU tensors.

def stepwise(inputs, weights):
    """Each product rounded, then summed in input order: fp32 torch, step by step."""
    total = inputs[0] * weights[0]
    for tensor, weight in zip(inputs[1:], weights[1:]):
        total = total + tensor * weight
    return total


def test_the_one_pass_kernel_is_built():
    """setup.py builds it at install; a build that failed would quietly leave the slower
    block path (the install goes on without a compiler), so the suite insists on it here."""
    from trainer import merge

    assert merge._native is not None, "trainer/_weighted_sum.c did not build: see pip's output"


SIZES = (0, 1, 15, 16, 17, 33, 1000, 4099)  # empty, shorter than a cache line, its edges


@pytest.mark.parametrize("count", [1, 2, 3, 16])
def test_one_pass_merge_has_the_block_paths_bits_and_a_float64_references_values(count):
    from trainer import merge

    generator = torch.Generator().manual_seed(count)
    updates = [({f"t{n}": torch.randn(n, generator=generator) for n in SIZES}, float(i + 1))
               for i in range(count)]
    total = sum(w for _, w in updates)
    merged = weighted_average(updates)
    blocked = {key: torch.empty_like(t) for key, t in merged.items()}
    merge.blocked_weighted_sum(blocked, [s for s, _ in updates], [w / total for _, w in updates])
    for key, tensor in merged.items():
        assert torch.equal(tensor, blocked[key]), key
        exact = sum(s[key].double() * (w / total) for s, w in updates)
        torch.testing.assert_close(tensor, exact.float(), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("threads", [1, 2, 3, 8])
@pytest.mark.parametrize("stream", [True, False])
def test_one_pass_sum_has_the_same_bits_on_any_thread_count_and_alignment(threads, stream):
    """Every buffer starts at its own offset from a cache line (streamed stores wait for the
    output's first whole line); the output's neighbours stay untouched."""
    from trainer import merge

    generator = torch.Generator().manual_seed(threads)
    count, weights = 10_007, [0.1, 0.2, 0.3, 0.15, 0.25]
    inputs = [torch.randn(count + 16, generator=generator)[offset:offset + count]
              for offset in (0, 1, 3, 8, 15)]
    room = torch.full((count + 9,), 7.0)
    out = room[5:5 + count]
    bad = merge._native.weighted_sum([out.data_ptr()], [t.data_ptr() for t in inputs], [count],
                                     weights, threads=threads, stream=stream)
    assert bad == -1
    assert torch.equal(out, stepwise(inputs, weights))
    assert torch.equal(room[:5], torch.full((5,), 7.0)) and torch.equal(room[-4:], room[:4])


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("at", [0, 40, 99])  # before the first whole line, in one, the tail
def test_one_pass_sum_finds_the_first_tensor_that_is_not_finite(threads, at):
    from trainer import merge

    tensors = [torch.ones(100) for _ in range(4)]
    tensors[2][at] = float("nan")
    tensors[3][at] = float("inf")
    outs = [torch.empty(101)[1:] for _ in tensors]  # 4 bytes past a line: a head to stream
    found = merge._native.weighted_sum([o.data_ptr() for o in outs],
                                       [t.data_ptr() for t in tensors], [100] * 4, [1.0],
                                       threads=threads)
    assert found == 2
    assert merge._native.weighted_sum([outs[0].data_ptr()], [tensors[3].data_ptr()], [100],
                                      [0.0], threads=threads) == 0  # 0 · Inf is NaN


def test_one_pass_merge_names_the_tensor_that_is_not_finite():
    def update(poison: float) -> dict[str, torch.Tensor]:
        state = {name: torch.ones(100) for name in ("a", "b", "c")}
        state["b"][99] = poison
        state["c"][40] = float("inf")
        return state

    updates = [(update(float("nan")), 1.0), (update(1.0), 1.0)]
    with pytest.raises(ValueError, match="input tensor 'b' holds NaN or Inf"):
        weighted_average(updates)
    merged = weighted_average(updates, check_finite=False)  # the caller validated: no check
    assert merged["b"][99].isnan() and merged["c"][40].isinf()


def test_one_pass_sum_rejects_what_it_cannot_take():
    from trainer import merge

    x, out = torch.ones(4), torch.empty(4)
    for args, kwargs, message in [
        (([out.data_ptr()], [x.data_ptr()], [4], [1.0]), {"threads": 0}, "threads"),
        (([out.data_ptr()], [x.data_ptr()], [4], []), {}, "inputs"),
        (([out.data_ptr()], [x.data_ptr(), x.data_ptr()], [4], [1.0]), {}, "inputs"),
        (([out.data_ptr()], [x.data_ptr()], [], [1.0]), {}, "length"),
        (([out.data_ptr()], [0], [4], [1.0]), {}, "null address"),
    ]:
        with pytest.raises(ValueError, match=message):
            merge._native.weighted_sum(*args, **kwargs)


def test_strided_inputs_take_the_block_path_with_the_same_bits(monkeypatch):
    from trainer import merge

    generator = torch.Generator().manual_seed(5)
    wide = [torch.randn(40, 30, generator=generator) for _ in range(3)]
    updates = [({"w": t.T}, float(i + 1)) for i, t in enumerate(wide)]  # not contiguous
    original, called = merge.blocked_weighted_sum, []
    monkeypatch.setattr(merge, "blocked_weighted_sum",
                        lambda *args, **kwargs: called.append(1) or original(*args, **kwargs))
    merged = weighted_average(updates)["w"]
    assert called, "a strided input went to the one-pass kernel"
    assert torch.equal(merged, stepwise([t.T for t in wide], [1 / 6, 2 / 6, 3 / 6]))


def test_an_output_that_is_one_of_the_inputs_is_refused():
    state = {"w": torch.ones(8)}
    with pytest.raises(ValueError, match="out\\['w'\\] shares memory with an input"):
        weighted_average([({"w": torch.zeros(8)}, 1.0), (state, 1.0)], out=state)


def test_without_the_kernel_the_merge_warns_once_and_gives_the_same_bits(monkeypatch):
    import sys
    import types

    from trainer import merge

    generator = torch.Generator().manual_seed(3)
    updates = [({"w": torch.randn(3000, generator=generator)}, float(i + 1)) for i in range(4)]
    one_pass = weighted_average(updates)["w"]
    monkeypatch.setitem(sys.modules, "_tributary_weighted_sum", None)  # import fails
    with pytest.warns(RuntimeWarning, match="not built"):
        assert merge._load_native() is None
    monkeypatch.setitem(sys.modules, "_tributary_weighted_sum",
                        types.SimpleNamespace(API=0, __file__="old.so"))
    with pytest.warns(RuntimeWarning, match="other sources"):
        assert merge._load_native() is None
    monkeypatch.setattr(merge, "_native", None)
    assert torch.equal(weighted_average(updates)["w"], one_pass)
