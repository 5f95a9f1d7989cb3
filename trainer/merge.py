"""Merge math: pure tensor functions, no Ray and no I/O (kept apart from orchestration)."""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, MutableMapping, Sequence

import torch


def _load_native():
    """The one-pass weighted sum that setup.py builds at install (trainer/_weighted_sum.c), or
    None, with a warning: merges are then correct but slower (README, "Merging")."""
    try:
        import _tributary_weighted_sum as native
    except ImportError:
        warnings.warn("_tributary_weighted_sum is not built (no C compiler when Tributary was "
                      "installed?): merges use torch's block path, slower; reinstall Tributary "
                      "where gcc or clang works", RuntimeWarning, stacklevel=3)
        return None
    if getattr(native, "API", None) != NATIVE_API:
        warnings.warn(f"{native.__file__} was built from other sources (API "
                      f"{getattr(native, 'API', None)}, not {NATIVE_API}): merges use torch's "
                      "block path, slower; reinstall Tributary", RuntimeWarning, stacklevel=3)
        return None
    return native


NATIVE_API = 1
_native = _load_native()
# Elements below which one more thread costs more to start than it saves.
MIN_THREAD_SHARE = 1 << 16

State = Mapping[str, torch.Tensor]


def weighted_average(
    updates: Sequence[tuple[State, float]],
    *,
    out: MutableMapping[str, torch.Tensor] | None = None,
    check_finite: bool = True,
) -> dict[str, torch.Tensor]:
    """Σ wᵢ·stateᵢ / Σ wᵢ, tensor by tensor, accumulated in fp32: each product rounded, then
    summed in input order, with the same bits on either path below.

    `out`, if given, holds preallocated tensors of the same keys and shapes and receives
    the result (saving a fresh allocation every round); it may not share memory with an
    input. Raises ValueError on mismatched keys or shapes, a non-positive or non-finite total
    weight, or (unless `check_finite` is off: the caller validated every input, as the
    merger does) non-finite input.
    """
    _check_updates(updates, out)
    total = float(sum(weight for _, weight in updates))
    result = {key: out[key] if out is not None else torch.empty(first.shape, dtype=torch.float32)
              for key, first in updates[0][0].items()}
    states, scales = [state for state, _ in updates], [weight / total for _, weight in updates]
    inputs = [state[key] for key in result for state in states]  # K per output, in order
    _check_apart(result, inputs, count=len(states))
    if _native is not None and _one_pass_takes([*result.values(), *inputs]):
        problem = _one_pass(result, inputs, scales)
    else:
        problem = blocked_weighted_sum(result, states, scales, check_finite=check_finite)
    if problem is not None and check_finite:
        raise ValueError(f"weighted_average: input tensor {problem!r} holds NaN or Inf")
    return result


def _one_pass_takes(tensors: Sequence) -> bool:
    """Whether the compiled sum takes these: fp32, contiguous, in CPU memory (torch tensors,
    object-store arrays among them). Anything else goes torch's block path."""
    return all(isinstance(t, torch.Tensor) and t.dtype == torch.float32 and t.is_cpu
               and t.is_contiguous() for t in tensors)


def _one_pass(out: Mapping[str, torch.Tensor], inputs: Sequence[torch.Tensor],
              scales: Sequence[float]) -> str | None:
    """Every output at once, each element summed from its K inputs and written once (the
    kernel reads `inputs` by address: this frame keeps them alive). Returns the first key
    whose result holds NaN or Inf, else None."""
    elements = sum(t.numel() for t in out.values())
    threads = max(1, min(torch.get_num_threads(), elements // MIN_THREAD_SHARE, 1024))
    bad = _native.weighted_sum([t.data_ptr() for t in out.values()],
                               [t.data_ptr() for t in inputs],
                               [t.numel() for t in out.values()], scales, threads=threads)
    return list(out)[bad] if bad >= 0 else None


def _check_apart(out: Mapping[str, torch.Tensor], inputs: Sequence[torch.Tensor], *,
                 count: int) -> None:
    """An output written over one of its own inputs would be read after it was overwritten
    (by the block path; by the kernel where it is offset)."""
    for index, (key, tensor) in enumerate(out.items()):
        start = tensor.data_ptr()
        end = start + tensor.numel() * tensor.element_size()
        for other in inputs[index * count:(index + 1) * count]:
            first = other.data_ptr()
            if (first < end and start < first + other.numel() * other.element_size()
                    and other.device == tensor.device):
                raise ValueError(f"weighted_average: out[{key!r}] shares memory with an input")


def blocked_weighted_sum(out: State, states: Sequence[State], scales: Sequence[float], *,
                         check_finite: bool = True) -> str | None:
    """out[key] = Σ scaleᵢ·statesᵢ[key] with torch's operations, one cache-sized block at a
    time: the path for inputs the one-pass kernel does not take (bf16, GPU, strided) or where
    it was not built. Returns the first key whose result holds NaN or Inf (looked for only
    with `check_finite`), else None."""
    scratch: torch.Tensor | None = None  # one product at a time, reused across tensors
    for key, acc in out.items():
        if scratch is None or scratch.device != acc.device:
            scratch = torch.empty(MERGE_BLOCK, dtype=torch.float32, device=acc.device)
        checksum = _block_sum(acc.view(-1), [(state[key].reshape(-1), scale)
                                             for state, scale in zip(states, scales)],
                              scratch=scratch, checksum=check_finite)
        if not math.isfinite(checksum):
            return key
    return None


# Elements of the output summed at a time: 4 MB of fp32, which stays in cache while every
# input's block is added to it, so memory sees each input read once and the output written
# once (K + 1 model sizes) instead of the output re-read and rewritten per input (3K). Larger
# blocks fall out of cache, smaller ones pay per-operation overhead (benchmarks/merge.py).
MERGE_BLOCK = 1 << 20


def _block_sum(acc: torch.Tensor, terms: list[tuple[torch.Tensor, float]], *,
               scratch: torch.Tensor, checksum: bool) -> float:
    """acc = Σ wᵢ·xᵢ over flat tensors, one cache-sized block at a time, in fp32 (torch's
    operations spread each block over the cores). Each product is rounded in `scratch` before
    it is added, as the kernel does: an add with alpha would fuse them (FMA) into other bits.
    With `checksum`, returns the sum of acc, taken block by block while each is in cache: NaN
    or Inf anywhere makes it non-finite (as `finite_problem`) without reading the output from
    memory again; else 0."""
    (first, first_weight), rest = terms[0], terms[1:]
    total = torch.zeros((), dtype=torch.float64)
    for start in range(0, acc.numel(), MERGE_BLOCK):
        block = acc[start:start + MERGE_BLOCK]
        _scaled(first[start:start + MERGE_BLOCK], first_weight, out=block)
        product = scratch[:block.numel()]
        for tensor, weight in rest:
            block.add_(_scaled(tensor[start:start + MERGE_BLOCK], weight, out=product))
        if checksum:  # one more operation per block: ~5 % of the merge at K = 2
            total += block.sum()
    return float(total)


def _scaled(x: torch.Tensor, weight: float, *, out: torch.Tensor) -> torch.Tensor:
    """out = x·weight in fp32 (bf16/fp16 inputs are widened first, so scaled in fp32)."""
    if x.dtype == torch.float32:
        return torch.mul(x, weight, out=out)
    return out.copy_(x).mul_(weight)


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
