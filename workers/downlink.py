"""Downlink compression: what a worker receives of the global weights, and how it keeps them.

With `merge.downlink: bf16 | int8` a worker keeps the global weights it last received. Each
version after that reaches it as the change since the version it holds, packed like the uplink
(workers/compression.py); worker and coordinator add the very same dequantised change to their
copies, so both hold bit-identical weights. A worker that holds nothing yet (new, restarted, or
after the coordinator went back past its version) gets a full copy once.

Versions of the weights sent down are named by a `Mark` (a coordinator's epoch and a counter),
never reused, so a worker can tell that a change fits what it holds.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass

import numpy as np
import torch

from workers.compression import Packed, payload_bytes, unpack_delta

Mark = tuple[str, int]  # (coordinator epoch, number of the change): one set of weights


@dataclass(frozen=True)
class FullCopy:
    """The whole global weights (fp32), marked."""

    mark: Mark
    weights: dict[str, np.ndarray]


@dataclass(frozen=True)
class Changes:
    """The global changes, in order, that bring the weights marked `base` to `mark`."""

    base: Mark
    mark: Mark
    changes: tuple[Packed, ...]


def apply_change(held: MutableMapping[str, np.ndarray], change: Packed) -> None:
    """held += the dequantised change, in place. Coordinator and workers both call this, so
    the same fp32 additions give the same bits on both sides."""
    for name, value in unpack_delta(change).items():
        target = torch.from_numpy(held[name])
        target.add_(torch.from_numpy(np.ascontiguousarray(value)).view(target.shape))


def weights_digest(weights: Mapping[str, np.ndarray]) -> str:
    """SHA-256 over the tensors' names and fp32 bytes, in name order: equal digests, equal
    bits."""
    digest = hashlib.sha256()
    for name in sorted(weights):
        digest.update(name.encode())
        digest.update(np.ascontiguousarray(np.asarray(weights[name], dtype=np.float32)).data)
    return digest.hexdigest()


class HeldWeights:
    """A worker's copy of the global weights and the mark of what it holds."""

    def __init__(self) -> None:
        self.mark: Mark | None = None
        self.weights: dict[str, np.ndarray] | None = None

    def receive(self, payload) -> tuple[Mapping[str, np.ndarray], int]:
        """(the round's global weights, bytes received). `payload` is a plain dict of arrays
        (no downlink compression: used as it is), a FullCopy, or Changes that must start
        from the mark held here."""
        if isinstance(payload, FullCopy):
            # A writable copy: the next changes are added to it in place.
            self.weights = {k: np.array(v, dtype=np.float32) for k, v in payload.weights.items()}
            self.mark = payload.mark
            return self.weights, payload_bytes(payload.weights)
        if isinstance(payload, Changes):
            if self.weights is None or self.mark != payload.base:
                held, self.mark, self.weights = self.mark, None, None
                raise RuntimeError(
                    f"downlink: this worker holds global weights {held}, the change sent "
                    f"starts from {payload.base}; the coordinator sends a full copy next time")
            for change in payload.changes:
                apply_change(self.weights, change)
            self.mark = payload.mark
            return self.weights, sum(payload_bytes(c) for c in payload.changes)
        self.mark, self.weights = None, None  # fp32: nothing kept between rounds
        return payload, payload_bytes(payload)
