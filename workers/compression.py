"""Delta compression for the trip from worker to coordinator, with error feedback.

`fp32` sends the delta as it is. `bf16` rounds it to bfloat16 (half the bytes); `int8`
quantizes it in blocks of 256 values with one fp32 scale per block (about a quarter of the
bytes). What rounding drops stays on the worker as a residual (error feedback, as in EF-SGD and
Streaming DiLoCo) and is added to the site's next delta, so no part of an update is lost, only
delayed. A NaN or Inf survives packing, so validation still sees it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

COMPRESSIONS = ("fp32", "bf16", "int8")
BLOCK = 256

Delta = dict[str, np.ndarray]


@dataclass(frozen=True)
class Packed:
    """A compressed delta: bf16 bits (as uint16) or int8 codes padded to whole blocks, with
    one fp32 scale per block for int8."""

    kind: str
    data: dict[str, np.ndarray]
    scales: dict[str, np.ndarray]
    shapes: dict[str, tuple[int, ...]]


def pack_delta(delta: Delta, *, kind: str, residual: Delta | None
               ) -> tuple[Delta | Packed, Delta | None]:
    """(payload, new residual) for `delta` plus the residual the site carried."""
    if kind == "fp32":
        return delta, None
    data, scales, new_residual = {}, {}, {}
    for name, array in delta.items():
        value = array if residual is None else array + residual[name]
        if kind == "bf16":
            bits = torch.from_numpy(np.ascontiguousarray(value)).to(torch.bfloat16)
            data[name] = bits.view(torch.int16).numpy().view(np.uint16)
            sent = bits.to(torch.float32).numpy()
        else:
            data[name], scales[name] = _quantize(value)
            sent = _dequantize(data[name], scales[name], value.shape)
        with np.errstate(invalid="ignore"):  # inf - inf: the update is refused anyway
            new_residual[name] = (value - sent).astype(np.float32)
    shapes = {name: tuple(a.shape) for name, a in delta.items()}
    return Packed(kind=kind, data=data, scales=scales, shapes=shapes), new_residual


def unpack_delta(payload: Delta | Packed) -> Delta:
    """The fp32 delta a payload stands for."""
    if not isinstance(payload, Packed):
        return payload
    if payload.kind == "bf16":
        return {name: torch.from_numpy(bits.view(np.int16).copy()).view(torch.bfloat16)
                .to(torch.float32).numpy().reshape(payload.shapes[name])
                for name, bits in payload.data.items()}
    return {name: _dequantize(codes, payload.scales[name], payload.shapes[name])
            for name, codes in payload.data.items()}


def payload_bytes(payload: Delta | Packed) -> int:
    if isinstance(payload, Packed):
        return sum(a.nbytes for a in payload.data.values()) + sum(
            a.nbytes for a in payload.scales.values())
    return sum(a.nbytes for a in payload.values())


def _quantize(value: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    flat = value.astype(np.float32).ravel()
    blocks = np.zeros(-(-flat.size // BLOCK) * BLOCK, dtype=np.float32)
    blocks[:flat.size] = flat
    blocks = blocks.reshape(-1, BLOCK)
    with np.errstate(invalid="ignore"):  # a NaN block keeps a NaN scale, for validation
        scale = np.abs(blocks).max(axis=1) / 127.0
        safe = np.where(scale > 0, scale, 1.0)
        codes = np.clip(np.rint(blocks / safe[:, None]), -127, 127)
    codes = np.nan_to_num(codes).astype(np.int8)
    return codes, scale.astype(np.float32)


def _dequantize(codes: np.ndarray, scale: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    size = int(np.prod(shape))
    with np.errstate(invalid="ignore"):  # 0 × an Inf scale: NaN, as validation should see
        values = codes.astype(np.float32) * scale[:, None]
    return values.ravel()[:size].reshape(shape)


def split_payload(payload: Delta | Packed, shards: list[list[str]]) -> list[Delta | Packed]:
    """The payload cut into one payload per shard (a list of tensor names each), compressed
    form kept, so each slice can travel to its reducer as its own object. A rank of a ZeRO
    site holds only some tensors: the others are left out of its slices."""
    if not isinstance(payload, Packed):
        return [{name: payload[name] for name in names if name in payload} for names in shards]
    return [Packed(kind=payload.kind,
                   data={n: payload.data[n] for n in names if n in payload.data},
                   scales={n: payload.scales[n] for n in names if n in payload.scales},
                   shapes={n: payload.shapes[n] for n in names if n in payload.shapes})
            for names in shards]
