"""benchmarks/memory.py: the fit and its check on the largest measured model."""

import importlib.util
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("memory_bench", REPO / "benchmarks" / "memory.py")
memory = importlib.util.module_from_spec(spec)
spec.loader.exec_module(memory)


def test_fit_is_least_squares_and_one_point_goes_through_zero():
    assert memory.fit([(1, 12), (3, 16), (5, 20)]) == pytest.approx((10.0, 2.0))
    assert memory.fit([(4, 10)]) == (0.0, 2.5)


def test_extrapolation_ratio_predicts_the_largest_from_the_smaller_sizes():
    # coordinator on the line 1 + 2P (ratio 1); the worker's largest point twice its line.
    points = [(10, 21, 100, 0), (20, 41, 200, 0), (40, 81, 800, 0)]
    parts = memory.extrapolation_ratios({"full fp32": points[::-1], "LoRA r16": points[:2]})
    assert parts == ["full fp32 coordinator 1.00", "full fp32 worker 2.00"]
