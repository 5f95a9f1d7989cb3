"""benchmarks/gpu_check.py's CPU twin: the same script the GPU check runs, on CPU with a tiny
model (what it prints about a GPU is checked where one exists: benchmarks/gpu_check.sh)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("gpu_check", REPO / "benchmarks" / "gpu_check.py")
gpu_check = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gpu_check)
peak_tflops = gpu_check.peak_tflops


def test_cpu_twin_trains_both_sites_and_merges_like_cpu():
    done = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--device", "cpu",
         "--model", "tiny", "--steps", "2", "--batch", "2", "--seq-len", "64"],
        capture_output=True, text=True, cwd=REPO, timeout=600, check=False)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert lines[-1] == "PASS"
    sites = [line for line in lines if line.startswith("  ")]
    assert [s.split(":")[0].strip() for s in sites] == ["speeches", "code"]
    assert all("tokens/s" in s for s in sites)


def test_peak_table_and_override():
    assert peak_tflops("NVIDIA H200", None) == 989.0
    assert peak_tflops("NVIDIA A100-SXM4-80GB", None) == 312.0
    assert peak_tflops("cpu", None) is None
    assert peak_tflops("NVIDIA H200", 500.0) == 500.0
