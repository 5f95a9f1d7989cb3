"""Where a DeepSpeed engine keeps each parameter on this rank, at any ZeRO stage and precision.

A parameter has two homes: the module's weight (the whole tensor, or at ZeRO-3 only this
rank's partition of it; bf16/fp16 under mixed precision) and the fp32 master the optimizer
steps (the module's weight itself in plain fp32; a slice of a flat fp32 buffer at ZeRO-1/2/3,
each rank holding only its own slice). Loading the global model writes both, the master
exactly from the global fp32 values (never through the rounded copy); the delta is read from
the masters, each rank sending only the slice it owns, so no rank ever gathers the model.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class Slice:
    """This rank's fp32 master values of one tensor: `values` (1-D) are elements
    [start, start + len(values)) of the flattened tensor, whose full shape is `shape`."""

    start: int
    values: torch.Tensor
    shape: tuple[int, ...]

    @property
    def whole(self) -> bool:
        return self.start == 0 and self.values.numel() == int(np.prod(self.shape))


class EngineWeights:
    """The parameters of one rank's DeepSpeed engine, by name, wherever they live."""

    def __init__(self, engine, *, rank: int) -> None:
        self.module, self.optimizer, self.rank = engine.module, engine.optimizer, rank
        self.params = dict(self.module.named_parameters())
        # Mixed precision at ZeRO-0: whole fp32 copies beside the module's bf16/fp16 weights.
        self.replica = _replica_masters(self.optimizer)

    @property
    def inner(self) -> torch.optim.Optimizer:
        """The torch optimizer that steps the masters (DeepSpeed wraps it at ZeRO ≥ 1 and
        under mixed precision)."""
        return getattr(self.optimizer, "optimizer", self.optimizer)

    def state_keys(self) -> list[torch.Tensor]:
        """The tensors the inner optimizer keeps state for, in a fixed order: the flat fp32
        partitions at ZeRO-1/2/3, the fp32 copies under mixed precision, or the parameters."""
        for attribute in ("fp32_partitioned_groups_flat", "single_partition_of_fp32_groups",
                          "fp32_groups_flat_partition", "fp32_groups_flat"):
            found = getattr(self.optimizer, attribute, None)
            if found:
                return list(found)
        if getattr(self.optimizer, "fp32_groups", None):
            return [t for group in self.optimizer.fp32_groups for t in group]
        return [p for group in self.inner.param_groups for p in group["params"]]

    def load_(self, weights: Mapping[str, object], *, strict: bool = True) -> None:
        """Overwrite the parameters named in `weights` (all of them when `strict`) with these
        global fp32 values, module and master alike."""
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # object-store arrays are read-only
            for name, param in self.params.items():
                if strict or name in weights:
                    self._load_one(param, torch.as_tensor(weights[name]))

    def masters(self, names: Iterable[str] | None = None) -> dict[str, Slice]:
        """The fp32 master values this rank owns of the trainable parameters (`names`: only
        these). Together, the ranks of a group own every element exactly once."""
        chosen = self.params if names is None else {n: self.params[n] for n in names}
        out = {}
        for name, param in chosen.items():
            if param.requires_grad:
                found = self._master(param)
                if found is not None:
                    out[name] = found
        return out

    # ------------------------------------------------------------------ one parameter

    def _load_one(self, param: torch.nn.Parameter, value: torch.Tensor) -> None:
        flat = value.reshape(-1)
        if hasattr(param, "ds_id"):  # ZeRO-3: only this rank's partition is here
            self._load_partition(param, flat)
            return
        param.copy_(value.reshape(param.shape).to(param.dtype))
        mapping = getattr(param, "_hp_mapping", None)
        if mapping is not None:  # ZeRO-1/2: this rank's fragment of the fp32 master
            address = mapping.lp_fragment_address
            mapping.get_hp_fragment().copy_(flat.narrow(0, address.start, address.numel))
        elif id(param) in self.replica:
            self.replica[id(param)].copy_(value.reshape(param.shape).float())

    def _load_partition(self, param: torch.nn.Parameter, flat: torch.Tensor) -> None:
        size = param.ds_tensor.numel()
        start = self.rank * size
        chunk = torch.zeros(size, dtype=torch.float32)
        valid = max(0, min(size, flat.numel() - start))
        chunk[:valid] = flat[start:start + valid]
        param.ds_tensor.copy_(chunk.view(param.ds_tensor.shape).to(param.ds_tensor.dtype))
        if param.requires_grad:
            self.optimizer.set_local_hp_param(chunk.to(param.ds_tensor.device), param)
        if param.numel() == flat.numel():  # a persistent parameter, kept whole between steps
            param.copy_(flat.view(param.shape).to(param.dtype))

    def _master(self, param: torch.nn.Parameter) -> Slice | None:
        if hasattr(param, "ds_id"):
            shape = tuple(param.ds_shape)
            size = param.ds_tensor.numel()
            start = self.rank * size
            valid = max(0, min(size, param.ds_numel - start))
            if valid == 0:
                return None
            values = self.optimizer.get_local_fp32_param(param)
            return Slice(start, values.detach().reshape(-1)[:valid].to("cpu"), shape)
        shape = tuple(param.shape)
        if hasattr(param, "_hp_mapping"):
            mapping = param._hp_mapping
            if mapping is None:  # another rank owns all of it
                return None
            return Slice(mapping.lp_fragment_address.start,
                         mapping.get_hp_fragment().detach().reshape(-1).to("cpu"), shape)
        if self.rank > 0:  # replicated: every rank holds the same values, rank 0 sends them
            return None
        master = self.replica.get(id(param), param)
        return Slice(0, master.detach().reshape(-1).to("cpu", torch.float32), shape)


def _replica_masters(optimizer) -> dict[int, torch.Tensor]:
    """{id(module param): its fp32 master} of DeepSpeed's ZeRO-0 mixed-precision optimizers
    (per-parameter copies, or one flat buffer per group)."""
    groups = getattr(optimizer, "fp16_groups", None)
    flats = getattr(optimizer, "fp32_groups_flat", None)
    if not groups or not (flats or getattr(optimizer, "fp32_groups", None)):
        return {}
    out: dict[int, torch.Tensor] = {}
    for index, group in enumerate(groups):
        offset = 0
        for position, param in enumerate(group):
            if flats:
                out[id(param)] = flats[index].narrow(0, offset, param.numel()).view(param.shape)
                offset += param.numel()
            else:
                out[id(param)] = optimizer.fp32_groups[index][position]
    return out


Layout = dict[str, tuple[int, tuple[int, ...]]]  # name -> (start, full shape) of a slice


def split_slices(slices: Mapping[str, Slice], base: Mapping[str, object]
                 ) -> tuple[dict[str, np.ndarray], Layout]:
    """(delta, layout): each slice minus the same elements of `base` (the global fp32
    weights), a whole tensor in its shape, a partial one flat with its place in `layout`."""
    delta, layout = {}, {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # object-store arrays are read-only
        for name, part in slices.items():
            flat = torch.as_tensor(base[name]).reshape(-1)
            own = flat[part.start:part.start + part.values.numel()].to(torch.float32)
            values = (part.values - own).numpy()
            if part.whole:
                delta[name] = values.reshape(part.shape)
            else:
                delta[name], layout[name] = values, (part.start, part.shape)
    return delta, layout


def assemble(pieces: Iterable[tuple[Mapping[str, np.ndarray], Layout]]) -> dict[str, np.ndarray]:
    """The whole delta from the pieces the ranks of a group sent, each (delta, layout): a
    tensor sent whole is taken as it is, the slices of one are put in place. Raises
    ValueError when the slices of a tensor do not add up to it."""
    out: dict[str, np.ndarray] = {}
    filled: dict[str, int] = {}
    for delta, layout in pieces:
        for name, values in delta.items():
            if name not in layout:
                if name in out:
                    raise ValueError(f"tensor {name!r} was sent whole by two ranks")
                out[name], filled[name] = values, values.size
                continue
            start, shape = layout[name]
            if name not in out:
                out[name], filled[name] = np.zeros(shape, dtype=np.float32), 0
            out[name].reshape(-1)[start:start + values.size] = values
            filled[name] += values.size
    short = sorted(n for n, array in out.items() if filled[n] != array.size)
    if short:
        raise ValueError(f"the ranks' slices of {short[:3]} do not cover them exactly; "
                         "were the ranks of the site started with different configs?")
    return out
