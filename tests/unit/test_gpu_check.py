"""benchmarks/gpu_check.py's CPU twin: the same script the GPU check runs, on CPU with a tiny
model (what it prints about a GPU is checked where one exists: benchmarks/gpu_check.sh)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

import trainer.merge

REPO = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("gpu_check", REPO / "benchmarks" / "gpu_check.py")
gpu_check = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gpu_check)
peak_tflops = gpu_check.peak_tflops
merge_errors = gpu_check.merge_errors


def test_cpu_twin_trains_both_sites_and_merges_like_cpu():
    done = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--device", "cpu",
         "--model", "tiny", "--steps", "2", "--batch", "2", "--seq-len", "64"],
        capture_output=True, text=True, cwd=REPO, timeout=600, check=False)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert lines[-1] == "PASS"
    # On CPU the device merge IS the CPU merge: only the float64 reference makes this a check.
    assert any(line.startswith("merge on cpu vs float64 reference: max relative difference")
               for line in lines), done.stdout
    sites = [line for line in lines if line.startswith("  ")]
    assert [s.split(":")[0].strip() for s in sites] == ["speeches", "code"]
    assert all("tokens/s" in s for s in sites)


def test_peak_table_and_override():
    assert peak_tflops("NVIDIA H200", None) == 989.0
    assert peak_tflops("NVIDIA A100-SXM4-80GB", None) == 312.0
    assert peak_tflops("cpu", None) is None
    assert peak_tflops("NVIDIA H200", 500.0) == 500.0


def _updates():
    rng = np.random.default_rng(0)
    return [SimpleNamespace(delta={"w": rng.standard_normal((8, 4)).astype(np.float32),
                                   "b": rng.standard_normal(4).astype(np.float32)},
                            weight=weight) for weight in (300.0, 100.0)]


def test_merge_check_passes_a_correct_merge_and_fails_one_that_drops_a_weight(monkeypatch):
    updates = _updates()
    assert merge_errors(updates, device="cpu")["float64 reference"] <= 1e-6

    def drops_second_weight(pairs, **kwargs):  # a merge that forgets update 2's weight
        return {k: v.to(torch.float32) for k, v in pairs[0][0].items()}

    monkeypatch.setattr(trainer.merge, "weighted_average", drops_second_weight)
    assert merge_errors(updates, device="cpu")["float64 reference"] > 0.1


def test_cpu_twin_of_the_multi_gpu_zero3_site_agrees_with_one_cpu_rank():
    """Two Ray worker actors at ZeRO-3 (fp32, every parameter partitioned), the update put
    together from both ranks' slices, against one rank at ZeRO-0 on the same rows."""
    done = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--device", "cpu",
         "--model", "tiny", "--steps", "2", "--batch", "2", "--seq-len", "64",
         "--zero3-ranks", "2"],
        capture_output=True, text=True, cwd=REPO, timeout=600, check=False)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    line = next(x for x in done.stdout.splitlines() if x.startswith("ZeRO-3 site of 2 ranks"))
    relative = float(line.rsplit("relative L2 ", 1)[1])
    assert relative <= gpu_check.ZERO3_TOLERANCE["cpu"]
    assert done.stdout.splitlines()[-1] == "PASS"
