"""benchmarks/summaries.py: the two summaries every benchmark prints."""

import importlib.util
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("summaries", REPO / "benchmarks" / "summaries.py")
summaries = importlib.util.module_from_spec(spec)
spec.loader.exec_module(summaries)


def test_median_range_is_the_median_then_min_and_max():
    assert summaries.median_range([3.0, 1.0, 10.0]) == "3.00 (1.00–10.00)"
    assert summaries.median_range([0.5, 0.25], "{:.1f}") == "0.4 (0.2–0.5)"


def test_mean_sd_signs_the_mean_only_and_says_when_there_is_no_spread():
    assert summaries.mean_sd([-10.0, 20.0], "{:+.1f}") == "+5.0 ± 21.2"
    assert summaries.mean_sd([0.1, 0.2], "{:.3f}") == "0.150 ± 0.071"
    assert summaries.mean_sd([2.0]) == "2.00 (1 seed: no spread)"
