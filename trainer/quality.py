"""Continual-learning quality: forgetting per eval set, and the gate a new version must pass."""

from __future__ import annotations

from collections.abc import Mapping, Sequence


def forgetting(history: Sequence[Mapping[str, float]], current: Mapping[str, float]
               ) -> dict[str, float]:
    """Per set, how much worse the current perplexity is than the best accepted one so far
    (current / best − 1, floored at 0): Avalanche's forgetting, in perplexity."""
    result = {}
    for name, value in current.items():
        best = min([h[name] for h in history if name in h] + [value])
        result[name] = max(0.0, value / best - 1.0)
    return result


def transfer(start: Mapping[str, float], current: Mapping[str, float], *,
             newest: Sequence[str]) -> dict[str, float | None]:
    """How the model moved since the start version, from each set's relative perplexity change
    (1 − current / start; above 0 is better): `newest_gain` averages the sets holding the
    newest data, `backward_transfer` every other set (below 0: old knowledge was lost)."""
    change = {name: 1.0 - value / start[name] for name, value in current.items() if name in start}
    new = [v for name, v in change.items() if name in newest]
    old = [v for name, v in change.items() if name not in newest]
    return {"backward_transfer": sum(old) / len(old) if old else None,
            "newest_gain": sum(new) / len(new) if new else None}


def gate_problems(current: Mapping[str, float], accepted: Mapping[str, float], *,
                  protected: Sequence[str], max_regression: float) -> list[str]:
    """Why a candidate version must be rejected: each protected set whose perplexity rose by
    more than `max_regression` (relative) over the last accepted version. Empty: accept."""
    problems = []
    for name in protected:
        if name not in accepted or name not in current:
            continue
        rise = current[name] / accepted[name] - 1.0
        if not rise <= max_regression:  # also catches NaN
            problems.append(f"{name}: perplexity {accepted[name]:.4g} -> {current[name]:.4g} "
                            f"(+{rise:.1%}, over quality.max_regression={max_regression:.1%})")
    return problems
