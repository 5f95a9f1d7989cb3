"""Merge math: pure tensor functions, no Ray and no I/O (kept apart from orchestration)."""

from __future__ import annotations

from collections.abc import Mapping, MutableMapping, Sequence

import torch

State = Mapping[str, torch.Tensor]


def weighted_average(
    updates: Sequence[tuple[State, float]],
    *,
    out: MutableMapping[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Σ wᵢ·stateᵢ / Σ wᵢ, tensor by tensor, accumulated in fp32.

    `out`, if given, holds preallocated tensors of the same keys and shapes and receives
    the result (saving a fresh allocation every round). Raises ValueError on mismatched
    keys or shapes, a non-positive or non-finite total weight, or non-finite input.
    """
    _check_updates(updates, out)
    total = float(sum(weight for _, weight in updates))
    result: dict[str, torch.Tensor] = {}
    for key in updates[0][0]:
        acc = torch.zeros(updates[0][0][key].shape, dtype=torch.float32)
        for state, weight in updates:
            acc.add_(state[key].to(torch.float32), alpha=weight / total)
        if not torch.isfinite(acc).all():
            raise ValueError(f"weighted_average: non-finite input in tensor {key!r}")
        if out is not None:
            out[key].copy_(acc)
            result[key] = out[key]
        else:
            result[key] = acc
    return result


def _check_updates(updates: Sequence[tuple[State, float]], out: State | None) -> None:
    if not updates:
        raise ValueError("weighted_average: no updates to average")
    weights = [float(w) for _, w in updates]
    if any(w != w or w in (float("inf"), float("-inf")) for w in weights):
        raise ValueError(f"weighted_average: non-finite weight in {weights}")
    if any(w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(
            f"weighted_average: weights must be >= 0 with a positive total, got {weights}")
    reference = updates[0][0]
    for index, (state, _) in enumerate(updates[1:], start=1):
        _check_same_layout(reference, state, what=f"update {index}")
    if out is not None:
        _check_same_layout(reference, out, what="out")


def _check_same_layout(reference: State, other: State, *, what: str) -> None:
    if set(reference) != set(other):
        missing = sorted(set(reference) - set(other))[:3]
        extra = sorted(set(other) - set(reference))[:3]
        raise ValueError(
            f"weighted_average: {what} has other keys (missing {missing}, extra {extra})")
    for key, tensor in reference.items():
        if tuple(other[key].shape) != tuple(tensor.shape):
            raise ValueError(
                f"weighted_average: {what} tensor {key!r} has shape {tuple(other[key].shape)}, "
                f"expected {tuple(tensor.shape)}")


def apply_delta(
    global_state: MutableMapping[str, torch.Tensor], delta: State, *, lr: float = 1.0
) -> None:
    """The outer step: θ ← θ + lr·Δ (FedAvg is lr = 1), in place."""
    for key, tensor in global_state.items():
        tensor.add_(delta[key].to(tensor.dtype), alpha=lr)
