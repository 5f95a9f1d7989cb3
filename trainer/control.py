"""Steering replay and the learning rate by what the evaluation sees.

The forgetting budget (`replay.target_forgetting`): an eval set that names the increments it
stands for (`eval[].covers: {site, files}`) tells how much of that knowledge is being lost —
its forgetting, the perplexity now over the best accepted version's, minus 1. When that is
over the budget beyond the noise (the lower end of its paired bootstrap interval), the strata
of those increments get more of the replay and the replay ratio rises, up to
`replay.max_ratio`; when it is under the budget beyond the noise, both come back down. The
quality gate steers too: a rejected candidate raises the replay of the strata its regressed
sets cover, halves the peak learning rate, and has its rows retried once with those settings
before they are set aside; `quality.max_rejections` in a row stop the run.

The state is part of the run state: saved in every manifest, restored by resume, sent to the
workers with each round's task. Every decision is recorded in the manifest and metrics.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field

from trainer.config import Cover
from trainer.evaluate import EvalResult, change_bounds

UP = 1.5  # how much a stratum's replay weight, and the ratio, move per decision
MAX_WEIGHT = 8.0
MIN_LR_SCALE = 0.125


@dataclass
class Control:
    # The replay ratio's factor over the config's (its schedule included), held so that the
    # steered ratio stays within replay.max_ratio.
    ratio_scale: float = 1.0
    weights: dict[str, float] = field(default_factory=dict)  # stratum -> replay weight
    lr_scale: float = 1.0  # the peak learning rate's factor (lowered after a rejection)
    retry: bool = False  # the last candidate was rejected: its rows are trained again once
    rejections: int = 0  # candidates rejected in a row
    decisions: list[dict] = field(default_factory=list)  # the last round's, for the record

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping) -> Control:
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})


def budget_step(control: Control, *, evals: Mapping[str, EvalResult],
                history: Sequence[Mapping[str, EvalResult]], covers: Mapping[str, Cover],
                strata: Sequence[str], target: float, z: float, base_ratio: float,
                max_ratio: float, groups: dict[str, list[str]] | None = None) -> Control:
    """One decision of the forgetting budget after an accepted version."""
    decisions, weights, over, under = [], dict(control.weights), False, True
    for name, cover in covers.items():
        seen = [h[name] for h in history if name in h]
        if name not in evals or not seen:
            continue
        best = min(seen, key=lambda r: r.perplexity)
        rise, low, high = change_bounds(evals[name], best, z=z)
        targets = cover.strata(strata, groups=groups)
        action = "raise" if low > target else "lower" if high < target else "hold"
        for stratum in targets:
            w = weights.get(stratum, 1.0)
            weights[stratum] = (min(w * UP, MAX_WEIGHT) if action == "raise"
                                else max(w / UP, 1.0) if action == "lower" else w)
        over, under = over or action == "raise", under and action == "lower"
        decisions.append({"set": name, "strata": targets, "forgetting": max(rise, 0.0),
                          "low": low, "high": high, "action": action})
    scale = control.ratio_scale
    scale = (raised(scale, base_ratio=base_ratio, max_ratio=max_ratio) if over
             else max(scale / UP, 1.0) if under and decisions else scale)
    return Control(ratio_scale=scale, weights={k: v for k, v in weights.items() if v != 1.0},
                   lr_scale=control.lr_scale, retry=control.retry,
                   rejections=control.rejections, decisions=decisions)


def raised(scale: float, *, base_ratio: float, max_ratio: float) -> float:
    """The ratio's factor one step up, so that base_ratio × factor stays ≤ max_ratio."""
    return min(scale * UP, max_ratio / base_ratio) if base_ratio > 0 else scale


def steered_ratio(control: Control, *, base_ratio: float, max_ratio: float) -> float | None:
    """The replay ratio a round trains with (None: the config's, unsteered)."""
    if control.ratio_scale == 1.0:
        return None
    return min(base_ratio * control.ratio_scale, max_ratio)


def after_gate(control: Control, *, rejected: bool, regressed: Sequence[str],
               covers: Mapping[str, Cover], strata: Sequence[str], max_ratio: float,
               base_ratio: float, budget: bool = False,
               groups: dict[str, list[str]] | None = None) -> Control:
    """The gate's steering: after a rejection more replay of what regressed, a halved peak
    lr, and one retry of the rows; after an acceptance the lr recovers step by step, and so
    does the replay ratio (unless the forgetting budget, `budget`, is the one that sets it)."""
    if not rejected:
        scale = control.ratio_scale if budget else max(control.ratio_scale / UP, 1.0)
        return Control(ratio_scale=scale, weights=control.weights,
                       lr_scale=min(1.0, control.lr_scale * 2), retry=False, rejections=0,
                       decisions=control.decisions)
    weights = dict(control.weights)
    for name in regressed:
        for stratum in covers[name].strata(strata, groups=groups) if name in covers else []:
            weights[stratum] = min(weights.get(stratum, 1.0) * UP, MAX_WEIGHT)
    decision = {"gate": "rejected", "regressed": list(regressed), "retry": not control.retry}
    return Control(ratio_scale=raised(control.ratio_scale, base_ratio=base_ratio,
                                      max_ratio=max_ratio), weights=weights,
                   lr_scale=max(control.lr_scale / 2, MIN_LR_SCALE), retry=not control.retry,
                   rejections=control.rejections + 1, decisions=[*control.decisions, decision])
