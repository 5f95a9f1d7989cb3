"""The merge's compiled weighted sum (trainer/weighted_sum.c): built at first use with the
machine's C compiler, cached, loaded with ctypes.

Where no compiler works the merge keeps its torch path (one warning says so): the kernel is
an optimisation, never a requirement. The build is cached under
`$TRIBUTARY_CACHE` (default `~/.cache/tributary`) by a hash of the source, the compiler's
version and the flags, written to a temporary name and renamed, so processes that build at
once (the coordinator and reducers on one node) never load half a file.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("weighted_sum.c")
# -ffp-contract=off: no fused multiply-add, so every machine computes the same bits. The
# vector width is chosen at run time inside the library (target_clones), not here.
FLAGS = ("-O3", "-ffp-contract=off", "-shared", "-fPIC", "-pthread")


@functools.cache
def weighted_sum_library() -> ctypes.CDLL | None:
    """The loaded kernel, or None (with one warning) where it cannot be built here."""
    if os.environ.get("TRIBUTARY_NATIVE_MERGE", "1") == "0":
        return None
    try:
        library = ctypes.CDLL(str(_built()))
    except (OSError, subprocess.SubprocessError) as error:
        log.warning("merge: the compiled weighted sum is unavailable (%s); using torch's "
                    "operations instead (correct, slower)", error)
        return None
    function = library.tributary_weighted_sum
    function.restype = None
    function.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                         ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_int,
                         ctypes.POINTER(ctypes.c_double)]
    return library


def native_weighted_sum(outs: Sequence[torch.Tensor], inputs: Sequence[Sequence[torch.Tensor]],
                        weights: Sequence[float], *, checksum: bool) -> float | None:
    """outs[t] = Σⱼ weights[j]·inputs[j][t] for every tensor t, in one call; the sum of all
    outputs with `checksum` (else 0.0). None, having done nothing, where the kernel is
    unavailable or a tensor is not a contiguous fp32 CPU tensor: the caller then does it."""
    library = weighted_sum_library()
    tensors = [*outs, *(t for group in inputs for t in group)]
    if library is None or not all(_plain_fp32(t) for t in tensors):
        return None
    count = len(outs)
    out_pointers = (ctypes.c_void_p * count)(*(t.data_ptr() for t in outs))
    in_pointers = (ctypes.c_void_p * (count * len(inputs)))(
        *(t.data_ptr() for group in inputs for t in group))
    floats = (ctypes.c_float * len(weights))(*weights)
    sizes = (ctypes.c_int64 * count)(*(t.numel() for t in outs))
    total = ctypes.c_double(0.0)
    # ctypes releases the GIL for the call: other Python threads go on while it sums.
    library.tributary_weighted_sum(out_pointers, in_pointers, floats, sizes, count, len(inputs),
                                   torch.get_num_threads(), int(checksum), ctypes.byref(total))
    return total.value


def _plain_fp32(tensor: torch.Tensor) -> bool:
    return (tensor.dtype == torch.float32 and tensor.device.type == "cpu"
            and tensor.is_contiguous())


def _built() -> Path:
    """The shared library for this source, compiler and machine, built if not cached."""
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise OSError("no C compiler (cc or gcc) on PATH")
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True,
                             check=True, timeout=30).stdout
    key = hashlib.sha256("\0".join([SOURCE.read_text(), version, *FLAGS,
                                    platform.machine()]).encode()).hexdigest()[:16]
    from trainer.model_source import cache_dir  # here: it imports transformers, once a build

    target = cache_dir() / "native" / key / "weighted_sum.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
        partial = Path(scratch) / target.name
        build = subprocess.run([compiler, *FLAGS, str(SOURCE), "-o", str(partial)],
                               check=False, capture_output=True, text=True, timeout=120)
        if build.returncode != 0:
            raise OSError(f"{compiler} failed on {SOURCE.name}: {build.stderr.strip()[-500:]}")
        os.replace(partial, target)
    return target
