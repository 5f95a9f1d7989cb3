"""Forgetting per eval set and the quality gate."""

import math

import pytest

from trainer.quality import forgetting, gate_problems, transfer


def test_forgetting_is_relative_to_the_best_so_far():
    history = [{"a": 10.0, "b": 5.0}, {"a": 8.0, "b": 6.0}]
    result = forgetting(history, {"a": 10.0, "b": 4.0})
    assert math.isclose(result["a"], 0.25) and result["b"] == 0.0


def test_gate_rejects_only_protected_regressions_beyond_tolerance():
    accepted = [{"probe": 10.0, "new": 10.0}]
    assert gate_problems({"probe": 10.4, "new": 20.0}, accepted, protected={"probe": "best"},
                         max_regression=0.05) == []
    (problem,) = gate_problems({"probe": 11.0, "new": 9.0}, accepted, protected={"probe": "best"},
                               max_regression=0.05)
    assert problem.startswith("probe: perplexity 11 is +10.0% over the best accepted")
    assert gate_problems({"probe": float("nan")}, accepted, protected={"probe": "best"},
                         max_regression=0.05)


def test_a_slow_drift_of_small_regressions_is_caught():
    """+4.9 % a round passes a last-version gate forever; against the best version (or the
    start) it is stopped once the drift adds up past the limit."""
    accepted, rejected_at = [{"probe": 10.0}], {}
    for baseline in ("best", "start"):
        accepted = [{"probe": 10.0}]
        for round_index in range(1, 6):
            candidate = {"probe": accepted[-1]["probe"] * 1.049}
            if gate_problems(candidate, accepted, protected={"probe": baseline},
                             max_regression=0.05):
                rejected_at[baseline] = round_index
                break
            accepted.append(candidate)
    assert rejected_at == {"best": 2, "start": 2}
    # "start" keeps judging against v0 even after an improvement; "best" against the best.
    history = [{"probe": 10.0}, {"probe": 8.0}]
    assert gate_problems({"probe": 8.8}, history, protected={"probe": "start"},
                         max_regression=0.05) == []
    assert gate_problems({"probe": 8.8}, history, protected={"probe": "best"},
                         max_regression=0.05)


def test_transfer_separates_the_newest_data_from_older_knowledge():
    start = {"newest": 20.0, "history": 40.0, "probe": 10.0}
    now = {"newest": 15.0, "history": 44.0, "probe": 9.0}
    result = transfer(start, now, newest=["newest"])
    assert result["newest_gain"] == pytest.approx(0.25)  # 20 -> 15
    assert result["backward_transfer"] == pytest.approx((-0.1 + 0.1) / 2)  # one lost, one gained
    assert transfer(start, now, newest=[])["newest_gain"] is None
