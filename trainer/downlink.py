"""The coordinator's side of downlink compression (workers/downlink.py has the worker's).

After every outer step the change of the global weights since the last version sent down is
packed (bf16, or int8 blocks), with error feedback: what rounding dropped is carried into the
next change, as on the uplink. The coordinator adds the dequantised change to its own copy and
makes that the global model, so the weights it evaluates, publishes and merges into are
bit-identical to what every worker holds. It remembers what each site holds and sends it the
changes since then, or a full copy when it holds nothing it can build on.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Mapping, MutableMapping

import numpy as np
import ray
import torch

from workers.compression import Packed, pack_delta
from workers.downlink import Changes, FullCopy, Mark, apply_change

RESIDUAL = "downlink.residual."  # the outer-state keys of the error feedback


class DownlinkSender:
    def __init__(self, *, kind: str, weights: MutableMapping[str, torch.Tensor],
                 keep: int) -> None:
        self.kind, self.weights, self.keep = kind, weights, max(1, keep)
        # What the workers hold: the global model as of the last change sent down.
        self.held = {k: v.detach().clone().numpy() for k, v in weights.items()}
        self.residual: dict[str, np.ndarray] | None = None
        self.epoch, self.count = uuid.uuid4().hex[:8], 0
        self.mark: Mark = (self.epoch, 0)
        self.chain: list[tuple[Mark, Mark, Packed]] = []  # (from, to, change), oldest first
        self.sites: dict[str, Mark] = {}  # what each site's workers hold
        self.refs: dict[Mark | None, object] = {}  # this mark's payloads, by what a site holds

    # ------------------------------------------------------------------ the global side

    def settle(self) -> None:
        """The outer step just changed the global weights: pack the change (plus what earlier
        rounding dropped), add its dequantised form to the held copy, and make that the global
        model."""
        change = {k: (t.numpy() - self.held[k]) for k, t in self.weights.items()}
        packed, self.residual = pack_delta(change, kind=self.kind, residual=self.residual)
        del change
        apply_change(self.held, packed)
        for name, tensor in self.weights.items():
            tensor.copy_(torch.from_numpy(self.held[name]))
        self.count += 1
        mark = (self.epoch, self.count)
        self.chain = [*self.chain, (self.mark, mark, packed)][-self.keep:]
        self.mark, self.refs = mark, {}

    def rewind(self, mark: Mark) -> None:
        """The global weights went back to those marked `mark` (a rejected candidate; the
        merger restores the residual with the outer state): hold them again; the changes after
        it are forgotten, so a site that got one gets a full copy."""
        for name, tensor in self.weights.items():
            self.held[name][...] = tensor.numpy()
        kept = [i for i, (_, to, _) in enumerate(self.chain) if to == mark]
        self.chain = self.chain[:kept[0] + 1] if kept else []
        self.mark, self.refs = mark, {}

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {RESIDUAL + k: torch.from_numpy(v) for k, v in (self.residual or {}).items()}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        residual = {k[len(RESIDUAL):]: v.numpy().copy() for k, v in state.items()
                    if k.startswith(RESIDUAL)}
        self.residual = residual or None

    # ------------------------------------------------------------------ the sites' side

    def message(self, site: str) -> FullCopy | Changes:
        """What `site` receives this time: the changes since the weights it holds, or a full
        copy when it holds none, or weights the chain no longer leads from."""
        held = self.sites.get(site)
        if held == self.mark:
            return Changes(base=held, mark=self.mark, changes=())
        start = next((i for i, (base, _, _) in enumerate(self.chain) if base == held), None)
        if held is None or start is None:
            return FullCopy(self.mark, self.held)
        return Changes(base=held, mark=self.mark,
                       changes=tuple(change for _, _, change in self.chain[start:]))

    def payload(self, site: str):
        """An object ref of `message(site)`, put once per mark and starting point (all the
        sites of a synchronous round share one). Building a message copies nothing."""
        message = self.message(site)
        key = message.base if isinstance(message, Changes) else None  # None: a full copy
        if key not in self.refs:
            self.refs[key] = ray.put(message)
        return self.refs[key]

    def send(self, site: str):
        """`payload(site)`, and the site holds this mark from then on (a worker that fails
        to take it in fails its task, and the fleet replaces it: `forget`)."""
        ref = self.payload(site)
        self.sites[site] = self.mark
        return ref

    def forget(self, sites: Iterable[str]) -> None:
        """These sites' workers failed (and are replaced): they hold nothing."""
        for site in sites:
            self.sites.pop(site, None)
