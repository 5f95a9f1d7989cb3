"""A worker's random number generators (python, numpy, torch CPU and device), captured with its
committed optimizer state and restored with it, so a resumed or rolled-back site draws the
same dropout masks and samples as one that never stopped."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

TENSORS = "rng.safetensors"
SCALARS = "rng.json"


def capture() -> dict:
    """Every generator's state, as plain data and uint8 tensors."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for index, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{index}"] = state
    return {"python": [version, list(internal), gauss],
            "numpy": [kind, keys.tolist(), pos, has_gauss, cached], "tensors": tensors}


def restore(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    tensors = state["tensors"]
    torch.set_rng_state(tensors["torch"])
    devices = sorted(k for k in tensors if k.startswith("cuda."))
    if devices and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([tensors[k] for k in devices])


def save(state: dict, folder: Path) -> None:
    save_file({k: v.contiguous() for k, v in state["tensors"].items()}, str(folder / TENSORS))
    (folder / SCALARS).write_text(json.dumps({"python": state["python"],
                                              "numpy": state["numpy"]}))


def load(folder: Path) -> dict | None:
    """The state saved in `folder`, or None (a state from before RNGs were saved)."""
    if not (folder / TENSORS).is_file():
        return None
    return {**json.loads((folder / SCALARS).read_text()),
            "tensors": load_file(str(folder / TENSORS))}
