"""Continual-learning quality: forgetting per eval set, and the gate a new version must pass."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from trainer.evaluate import EvalResult, change_bounds


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


def gate_problems(current: Mapping[str, EvalResult], accepted: Sequence[Mapping[str, EvalResult]],
                  *, protected: Mapping[str, str], max_regression: float, z: float = 0.0
                  ) -> list[str]:
    """Why a candidate version must be rejected: each protected set whose perplexity rose by
    more than `max_regression` (relative) over its baseline — the best accepted version so far
    ("best"), or the start version ("start"), chosen per set in `protected` {name: baseline} —
    and by more than the noise: the lower end of the rise's z-sided interval (a paired
    bootstrap over the set's documents) must be past the limit. Judging against the best (not
    the last) catches a slow drift of small regressions, each within the limit. `accepted` are
    the accepted versions' results, oldest first. Empty: accept."""
    problems = []
    for name, baseline in protected.items():
        seen = [a[name] for a in accepted if name in a]
        if not seen or name not in current:
            continue
        reference = seen[0] if baseline == "start" else min(seen, key=lambda r: r.perplexity)
        rise, low, _ = change_bounds(current[name], reference, z=z)
        if not low <= max_regression:  # also catches NaN
            problems.append(
                f"{name}: perplexity {current[name].perplexity:.4g} is +{rise:.1%} over the "
                f"{baseline} accepted version's {reference.perplexity:.4g} (at least "
                f"+{low:.1%} beyond the noise; quality.max_regression={max_regression:.1%})")
    return problems


def perplexities(results: Mapping[str, EvalResult]) -> dict[str, float]:
    return {name: result.perplexity for name, result in results.items()}
