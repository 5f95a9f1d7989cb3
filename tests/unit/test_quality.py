"""Forgetting per eval set and the quality gate."""

import math

import numpy as np
import pytest

from trainer.evaluate import EvalResult
from trainer.quality import forgetting, gate_problems, transfer


def test_forgetting_is_relative_to_the_best_so_far():
    history = [{"a": 10.0, "b": 5.0}, {"a": 8.0, "b": 6.0}]
    result = forgetting(history, {"a": 10.0, "b": 4.0})
    assert math.isclose(result["a"], 0.25) and result["b"] == 0.0


def result(perplexity: float) -> EvalResult:
    return EvalResult(perplexity=perplexity)  # no documents: the point is exact


def test_gate_rejects_only_protected_regressions_beyond_tolerance():
    accepted = [{"probe": result(10.0), "new": result(10.0)}]
    best = {"probe": "best"}
    assert gate_problems({"probe": result(10.4), "new": result(20.0)}, accepted, protected=best,
                         max_regression=0.05) == []
    (problem,) = gate_problems({"probe": result(11.0), "new": result(9.0)}, accepted,
                               protected=best, max_regression=0.05)
    assert problem.startswith("probe: perplexity 11 is +10.0% over the best accepted")
    assert gate_problems({"probe": result(float("nan"))}, accepted, protected=best,
                         max_regression=0.05)


def test_a_slow_drift_of_small_regressions_is_caught():
    """+4.9 % a round passes a last-version gate forever; against the best version (or the
    start) it is stopped once the drift adds up past the limit."""
    rejected_at = {}
    for baseline in ("best", "start"):
        accepted = [{"probe": result(10.0)}]
        for round_index in range(1, 6):
            candidate = {"probe": result(accepted[-1]["probe"].perplexity * 1.049)}
            if gate_problems(candidate, accepted, protected={"probe": baseline},
                             max_regression=0.05):
                rejected_at[baseline] = round_index
                break
            accepted.append(candidate)
    assert rejected_at == {"best": 2, "start": 2}
    # "start" keeps judging against v0 even after an improvement; "best" against the best.
    history = [{"probe": result(10.0)}, {"probe": result(8.0)}]
    assert gate_problems({"probe": result(8.8)}, history, protected={"probe": "start"},
                         max_regression=0.05) == []
    assert gate_problems({"probe": result(8.8)}, history, protected={"probe": "best"},
                         max_regression=0.05)


def documents(rng, count: int, mean: float, noise: float) -> EvalResult:
    """A set of `count` documents of 100 tokens whose mean NLL varies by `noise`."""
    tokens = np.full(count, 100.0)
    nll = tokens * (mean + rng.normal(0, noise, count))
    return EvalResult(perplexity=math.exp(nll.sum() / tokens.sum()), doc_nll=nll,
                      doc_tokens=tokens)


def test_the_gate_acts_only_on_changes_beyond_the_noise():
    """A 10 % rise measured on noisy documents is not enough evidence; the same rise on quiet
    documents is. Paired: the same documents under two versions."""
    rng = np.random.default_rng(0)
    base = documents(rng, 40, mean=2.0, noise=0.0)
    for noise, rejects in ((0.6, False), (0.02, True)):
        jitter = rng.normal(0, noise, 40) * 100
        worse = EvalResult(perplexity=base.perplexity * 1.10,
                           doc_nll=base.doc_nll + math.log(1.10) * 100 + jitter,
                           doc_tokens=base.doc_tokens)
        problems = gate_problems({"p": worse}, [{"p": base}], protected={"p": "best"},
                                 max_regression=0.05, z=1.645)
        assert bool(problems) == rejects, (noise, problems)


def test_transfer_separates_the_newest_data_from_older_knowledge():
    start = {"newest": 20.0, "history": 40.0, "probe": 10.0}
    now = {"newest": 15.0, "history": 44.0, "probe": 9.0}
    result = transfer(start, now, newest=["newest"])
    assert result["newest_gain"] == pytest.approx(0.25)  # 20 -> 15
    assert result["backward_transfer"] == pytest.approx((-0.1 + 0.1) / 2)  # one lost, one gained
    assert transfer(start, now, newest=[])["newest_gain"] is None
