"""Merge math: pure tensor functions, no Ray and no I/O (kept apart from orchestration)."""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, MutableMapping, Sequence

import torch

try:  # the one-pass weighted sum, built at install from trainer/_weighted_sum.c (pyproject.toml)
    from trainer import _weighted_sum as _native
except ImportError:  # no C compiler at install: correct, about 0.8x the speed (README)
    _native = None
    warnings.warn("trainer._weighted_sum is not built (no C compiler when Tributary was "
                  "installed?): merges use torch's block path, slower; reinstall Tributary "
                  "where gcc or clang works", RuntimeWarning, stacklevel=2)

State = Mapping[str, torch.Tensor]


def weighted_average(
    updates: Sequence[tuple[State, float]],
    *,
    out: MutableMapping[str, torch.Tensor] | None = None,
    check_finite: bool = True,
) -> dict[str, torch.Tensor]:
    """Σ wᵢ·stateᵢ / Σ wᵢ, tensor by tensor, accumulated in fp32.

    `out`, if given, holds preallocated tensors of the same keys and shapes and receives
    the result (saving a fresh allocation every round). Raises ValueError on mismatched
    keys or shapes, a non-positive or non-finite total weight, or (unless `check_finite` is
    off: the caller validated every input, as the merger does) non-finite input.
    """
    _check_updates(updates, out)
    total = float(sum(weight for _, weight in updates))
    result = {key: out[key] if out is not None else torch.empty(first.shape, dtype=torch.float32)
              for key, first in updates[0][0].items()}
    states, scales = [state for state, _ in updates], [weight / total for _, weight in updates]
    if _one_pass(result, states):
        bad = _native.weighted_sum(
            [t.data_ptr() for t in result.values()],
            [state[key].data_ptr() for key in result for state in states],
            [t.numel() for t in result.values()], scales, threads=torch.get_num_threads())
        problem = list(result)[bad] if bad >= 0 else None
    else:
        problem = blocked_weighted_sum(result, states, scales, check_finite=check_finite)
    if problem is not None and check_finite:
        raise ValueError(f"weighted_average: input tensor {problem!r} holds NaN or Inf")
    return result


def _one_pass(out: State, states: Sequence[State]) -> bool:
    """Whether the compiled one-pass sum takes these: fp32, contiguous, in CPU memory (torch
    tensors, object-store arrays among them). Anything else goes the torch block path."""
    tensors = [*out.values(), *(tensor for state in states for tensor in state.values())]
    return _native is not None and all(
        isinstance(t, torch.Tensor) and t.dtype == torch.float32 and t.is_cpu
        and t.is_contiguous() for t in tensors)


def blocked_weighted_sum(out: State, states: Sequence[State], scales: Sequence[float], *,
                         check_finite: bool = True) -> str | None:
    """out[key] = Σ scaleᵢ·statesᵢ[key] with torch's operations, one cache-sized block at a
    time: the path for inputs the one-pass kernel does not take (bf16, GPU, strided) or where
    it was not built. Returns the first key whose result holds NaN or Inf (looked for only
    with `check_finite`), else None."""
    for key, acc in out.items():
        checksum = _block_sum(acc.view(-1), [(state[key].reshape(-1), scale)
                                             for state, scale in zip(states, scales)],
                              checksum=check_finite)
        if not math.isfinite(checksum):
            return key
    return None


# Elements of the output summed at a time: 4 MB of fp32, which stays in cache while every
# input's block is added to it, so memory sees each input read once and the output written
# once (K + 1 model sizes) instead of the output re-read and rewritten per input (3K). Larger
# blocks fall out of cache, smaller ones pay per-operation overhead (benchmarks/merge.py).
MERGE_BLOCK = 1 << 20


def _block_sum(acc: torch.Tensor, terms: list[tuple[torch.Tensor, float]], *,
               checksum: bool) -> float:
    """acc = Σ wᵢ·xᵢ over flat tensors, one cache-sized block at a time, in fp32 (torch's
    operations spread each block over the cores). With `checksum`, returns the sum of acc,
    taken block by block while each is in cache: NaN or Inf anywhere makes it non-finite (as
    `finite_problem`) without reading the output from memory again; else 0."""
    (first, first_weight), rest = terms[0], terms[1:]
    total = torch.zeros((), dtype=torch.float64)
    for start in range(0, acc.numel(), MERGE_BLOCK):
        block = acc[start:start + MERGE_BLOCK]
        head = first[start:start + MERGE_BLOCK]
        if head.dtype == torch.float32:
            torch.mul(head, first_weight, out=block)
        else:  # widen first, so bf16/fp16 inputs are scaled in fp32
            block.copy_(head).mul_(first_weight)
        for tensor, weight in rest:
            block.add_(tensor[start:start + MERGE_BLOCK], alpha=weight)
        if checksum:  # one more operation per block: ~5 % of the merge at K = 2
            total += block.sum()
    return float(total)


def trimmed_mean(
    updates: Sequence[tuple[State, float]],
    *,
    trim_fraction: float,
    out: MutableMapping[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Coordinate-wise mean after dropping the floor(trim_fraction·K) largest and smallest
    values of each coordinate across the K updates. Weights are ignored on purpose: a robust
    merge must not let one site's claimed weight decide. trim_fraction 0.5 (or any value that
    leaves one or two per coordinate) is the coordinate-wise median."""
    _check_updates(updates, out, name="trimmed_mean")
    count = len(updates)
    cut = min(int(trim_fraction * count), (count - 1) // 2)
    result: dict[str, torch.Tensor] = {}
    for key, first in updates[0][0].items():
        acc = out[key] if out is not None else torch.empty(first.shape, dtype=torch.float32)
        flat, inputs = acc.view(-1), [state[key].reshape(-1) for state, _ in updates]
        # Block by block, as the weighted average: the K values of a block are stacked and
        # sorted while in cache (a whole-tensor stack would copy every input once more).
        for start in range(0, flat.numel(), ROBUST_BLOCK):
            block = slice(start, start + ROBUST_BLOCK)
            stacked = torch.stack([x[block].to(torch.float32) for x in inputs])
            kept = stacked.sort(dim=0).values[cut:count - cut] if cut else stacked
            torch.mean(kept, dim=0, out=flat[block])
        _check_finite(acc, key=key, name="trimmed_mean")
        result[key] = acc
    return result


# Elements per block of the robust merges: K stacked fp32 blocks of 1 MB each stay in cache.
ROBUST_BLOCK = 1 << 18


def median(
    updates: Sequence[tuple[State, float]],
    *,
    out: MutableMapping[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Coordinate-wise median (the mean of the two middle values for an even count)."""
    return trimmed_mean(updates, trim_fraction=0.5, out=out)


def finite_problem(state: Mapping, *, name: str = "delta") -> str | None:
    """Which tensor holds NaN or Inf (None: none). One streaming sum a tensor, no mask
    (isfinite().all() costs six times as much); a sum past the fp32 range counts too."""
    for key, tensor in state.items():
        if not math.isfinite(float(_as_tensor(tensor).sum())):
            return f"{name} tensor {key!r} holds NaN or Inf"
    return None


def layout_problem(state: Mapping, shapes: Mapping[str, tuple[int, ...]], *,
                   name: str = "delta") -> str | None:
    """How `state`'s tensors differ from the expected names and shapes (None: they match)."""
    if set(state) != set(shapes):
        missing = sorted(set(shapes) - set(state))[:3]
        extra = sorted(set(state) - set(shapes))[:3]
        return f"{name} has the wrong tensors (missing {missing}, unexpected {extra})"
    for key, shape in shapes.items():
        if tuple(state[key].shape) != tuple(shape):
            return (f"{name} tensor {key!r} has shape {tuple(state[key].shape)}, "
                    f"expected {tuple(shape)}")
    return None


def _as_tensor(array) -> torch.Tensor:
    if isinstance(array, torch.Tensor):
        return array
    with warnings.catch_warnings():  # object-store arrays are read-only; we only read them
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(array)


def _check_finite(tensor: torch.Tensor, *, key: str, name: str) -> None:
    problem = finite_problem({key: tensor}, name=f"{name}: input")
    if problem:
        raise ValueError(problem)


def _check_updates(updates: Sequence[tuple[State, float]], out: State | None, *,
                   name: str = "weighted_average") -> None:
    if not updates:
        raise ValueError(f"{name}: no updates to average")
    weights = [float(w) for _, w in updates]
    if not all(math.isfinite(w) for w in weights):
        raise ValueError(f"{name}: non-finite weight in {weights}")
    if any(w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(
            f"{name}: weights must be >= 0 with a positive total, got {weights}")
    reference = updates[0][0]
    for index, (state, _) in enumerate(updates[1:], start=1):
        _check_same_layout(reference, state, what=f"{name}: update {index}")
    if out is not None:
        _check_same_layout(reference, out, what=f"{name}: out")


def _check_same_layout(reference: State, other: State, *, what: str) -> None:
    problem = layout_problem(other, {k: tuple(t.shape) for k, t in reference.items()},
                             name=what)
    if problem:
        raise ValueError(problem)


def apply_delta(
    global_state: MutableMapping[str, torch.Tensor], delta: State, *, lr: float = 1.0
) -> None:
    """The outer step: θ ← θ + lr·Δ (FedAvg is lr = 1), in place."""
    for key, tensor in global_state.items():
        tensor.add_(delta[key].to(tensor.dtype), alpha=lr)
