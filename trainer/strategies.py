"""Merge strategies: how a round's validated updates become the next global model.

The shape is Flower's: a strategy aggregates the round's results (delta, weight) into one
pseudo-gradient and takes the outer step on the global weights in place; an empty round keeps
the previous global. Outer-optimizer state lives in the strategy and is checkpointed with
every version as safetensors (`state_dict` / `load_state_dict`). The tensor math of combining
deltas is in trainer.merge; the result lands in buffers kept across rounds (no page faults
from fresh allocations every round).

  fedavg        token-weighted average, outer lr 1 (McMahan et al.)
  momentum      the average taken as an outer gradient with (Nesterov) momentum (DiLoCo:
                lr 0.7, momentum 0.9)
  fedadam       Adam on the averaged delta (Reddi et al., "Adaptive Federated Optimization")
  trimmed_mean  coordinate-wise mean without the largest and smallest trim_fraction of values
  median        coordinate-wise median
"""

from __future__ import annotations

from collections.abc import Mapping, MutableMapping, Sequence
from dataclasses import dataclass, field

import torch

from trainer.merge import State, apply_delta, median, trimmed_mean, weighted_average

STRATEGIES = ("fedavg", "momentum", "fedadam", "trimmed_mean", "median")
DEFAULT_OUTER_LR = {"fedavg": 1.0, "momentum": 0.7, "fedadam": 1e-3, "trimmed_mean": 1.0,
                    "median": 1.0}


class FedAvg:
    """The weighted average of the deltas, applied with an outer learning rate."""

    def __init__(self, *, lr: float = 1.0) -> None:
        self.lr = lr
        self.buffers: dict[str, torch.Tensor] = {}  # the combined delta, reused every round

    def aggregate(self, global_state: MutableMapping[str, torch.Tensor],
                  updates: Sequence[tuple[State, float]], *, scale: float = 1.0) -> None:
        """`scale` shrinks the combined delta before the outer step (merge.mode async: the
        buffer's mean staleness discount, which the weighted average alone would cancel)."""
        if not updates:  # nothing to merge: keep the previous global
            return
        delta = self.combine(updates, out=self._buffers(global_state))
        if scale != 1.0:
            for tensor in delta.values():
                tensor.mul_(scale)
        self.step(global_state, delta)

    def combine(self, updates: Sequence[tuple[State, float]], *,
                out: MutableMapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        # The merger validated every input (trainer/validate.py): no second finite check.
        return weighted_average(updates, out=out, check_finite=False)

    def step(self, global_state: MutableMapping[str, torch.Tensor], delta: State) -> None:
        apply_delta(global_state, delta, lr=self.lr)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        if state:
            raise ValueError(f"{type(self).__name__} keeps no outer state; got {sorted(state)[:3]}")

    def _buffers(self, like: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if not self.buffers:
            self.buffers = {k: torch.zeros(v.shape, dtype=torch.float32) for k, v in like.items()}
        return self.buffers


class TrimmedMean(FedAvg):
    def __init__(self, *, lr: float = 1.0, trim_fraction: float = 0.1) -> None:
        super().__init__(lr=lr)
        self.trim_fraction = trim_fraction

    def combine(self, updates, *, out):
        return trimmed_mean(updates, trim_fraction=self.trim_fraction, out=out)


class Median(FedAvg):
    def combine(self, updates, *, out):
        return median(updates, out=out)


class OuterMomentum(FedAvg):
    """DiLoCo's outer step: b ← μ·b + Δ; θ ← θ + lr·(Δ + μ·b) with Nesterov, else lr·b.
    (The same as torch SGD on the outer gradient −Δ.)"""

    def __init__(self, *, lr: float = 0.7, momentum: float = 0.9, nesterov: bool = True) -> None:
        super().__init__(lr=lr)
        self.momentum, self.nesterov = momentum, nesterov
        self.velocity: dict[str, torch.Tensor] = {}

    def step(self, global_state, delta):
        for key, tensor in global_state.items():
            velocity = self.velocity.setdefault(key, torch.zeros_like(delta[key]))
            velocity.mul_(self.momentum).add_(delta[key])
            if self.nesterov:
                tensor.add_(delta[key] + self.momentum * velocity, alpha=self.lr)
            else:
                tensor.add_(velocity, alpha=self.lr)

    def state_dict(self):
        return {f"velocity.{k}": v for k, v in self.velocity.items()}

    def load_state_dict(self, state):
        self.velocity = {k.removeprefix("velocity."): v.clone() for k, v in state.items()}


class FedAdam(FedAvg):
    """m ← β1·m + (1−β1)·Δ; v ← β2·v + (1−β2)·Δ²; θ ← θ + lr·m / (√v + τ) (Reddi et al.:
    no bias correction; τ, here `eps`, sets how adaptive the step is)."""

    def __init__(self, *, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.99),
                 eps: float = 1e-3) -> None:
        super().__init__(lr=lr)
        self.betas, self.eps = betas, eps
        self.moments: dict[str, torch.Tensor] = {}

    def step(self, global_state, delta):
        beta1, beta2 = self.betas
        for key, tensor in global_state.items():
            m = self.moments.setdefault(f"m.{key}", torch.zeros_like(delta[key]))
            v = self.moments.setdefault(f"v.{key}", torch.zeros_like(delta[key]))
            m.mul_(beta1).add_(delta[key], alpha=1 - beta1)
            v.mul_(beta2).addcmul_(delta[key], delta[key], value=1 - beta2)
            tensor.add_(m / (v.sqrt() + self.eps), alpha=self.lr)

    def state_dict(self):
        return dict(self.moments)

    def load_state_dict(self, state):
        self.moments = {k: v.clone() for k, v in state.items()}


def build_strategy(name: str, *, lr: float | None = None, momentum: float = 0.9,
                   nesterov: bool = True, betas: Sequence[float] = (0.9, 0.99),
                   eps: float = 1e-3, trim_fraction: float = 0.1) -> FedAvg:
    """The strategy `name` (one of STRATEGIES) with its outer lr, or its default."""
    lr = DEFAULT_OUTER_LR[name] if lr is None else lr
    if name == "momentum":
        return OuterMomentum(lr=lr, momentum=momentum, nesterov=nesterov)
    if name == "fedadam":
        return FedAdam(lr=lr, betas=(betas[0], betas[1]), eps=eps)
    if name == "trimmed_mean":
        return TrimmedMean(lr=lr, trim_fraction=trim_fraction)
    if name == "median":
        return Median(lr=lr)
    return FedAvg(lr=lr)


@dataclass(frozen=True)
class MergeConfig:
    """The config's `merge:` section: what a round needs to merge, and the strategy that
    turns its updates into the next global (`build`)."""

    min_workers: int = 1
    round_timeout_s: float = 1800.0
    # Reject an update whose delta norm is over this many times the others' median norm.
    max_norm_ratio: float = 10.0
    # Attempts at one round (too few valid updates) before the run stops.
    max_round_attempts: int = 3
    # How updates become the next global: one of STRATEGIES.
    strategy: str = "fedavg"
    outer_lr: float | None = None  # None: the strategy's default
    outer_momentum: float = 0.9
    nesterov: bool = True
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.99])
    adam_eps: float = 1e-3
    trim_fraction: float = 0.1
    # How workers send their deltas: "fp32", "bf16" or "int8" (with error feedback).
    compression: str = "fp32"
    # Off only to measure what it buys (benchmarks/compression.py): rounding is then lost.
    error_feedback: bool = True
    # How workers receive the global weights: "fp32" (a full copy every round) or "bf16" /
    # "int8": the change since the version a worker holds, packed like the uplink with error
    # feedback, applied bit-identically on both sides (trainer/downlink.py). downlink_keep
    # changes are kept for sites that are behind; one further behind gets a full copy.
    downlink: str = "fp32"
    downlink_keep: int = 4
    # 0: the coordinator combines whole deltas itself. N: N reducer actors each combine one
    # slice of the tensors of every delta where it lies (coordinator memory stays ~2× the
    # model whatever the number of workers; see trainer/reduce.py).
    reducers: int = 0
    # "sync": a round waits for every site; "async": no site waits (trainer/asynchronous.py):
    # every `buffer` updates are merged, each weighed by (1 + staleness)^-staleness_exponent,
    # and an update more than max_staleness versions old is refused (its rows retrained).
    mode: str = "sync"
    buffer: int = 1
    staleness_exponent: float = 0.5
    max_staleness: int = 4

    def build(self) -> FedAvg:
        """The strategy this section describes, with its outer-optimizer settings."""
        return build_strategy(self.strategy, lr=self.outer_lr, momentum=self.outer_momentum,
                              nesterov=self.nesterov, betas=self.adam_betas, eps=self.adam_eps,
                              trim_fraction=self.trim_fraction)
