"""The forgetting budget and the gate's steering: replay of the strata whose eval sets forget
more than the budget goes up (and comes back down when they are under it), bounded; a
rejection halves the peak lr and retries the rows once; the state round-trips through the
manifest."""

from __future__ import annotations

import math

import numpy as np
import pytest

from trainer.config import Cover
from trainer.control import Control, after_gate, budget_step, steered_ratio
from trainer.evaluate import EvalResult

STRATA = ["speeches/1790s.parquet", "speeches/1800s.parquet", "code/01-text.jsonl"]
COVERS = {"old_speeches": Cover(site="speeches", files=["17*"]), "code": Cover(site="code")}


def result(perplexity: float, *, docs: int = 50, noise: float = 0.0, seed: int = 0) -> EvalResult:
    """`docs` documents of 100 tokens at this perplexity, each off by `noise` in log space."""
    tokens = np.full(docs, 100.0)
    jitter = np.random.default_rng(seed).normal(0, noise, docs)
    nll = (math.log(perplexity) + jitter - jitter.mean()) * tokens
    return EvalResult(perplexity=perplexity, doc_nll=nll, doc_tokens=tokens)


def step(control: Control, evals: dict, history: list) -> Control:
    return budget_step(control, evals=evals, history=history, covers=COVERS, strata=STRATA,
                       target=0.05, z=1.645, base_ratio=0.25, max_ratio=0.5)


def test_forgetting_over_the_budget_raises_its_strata_and_the_ratio_bounded():
    history = [{"old_speeches": result(20.0), "code": result(10.0)}]
    control = Control()
    for _ in range(4):  # old speeches 20 % worse, again and again
        control = step(control, {"old_speeches": result(24.0), "code": result(10.0)}, history)
    assert control.weights == {"speeches/1790s.parquet": pytest.approx(1.5 ** 4)}
    assert control.ratio_scale == 2.0  # 0.25 × 1.5 × 1.5 … held at replay.max_ratio 0.5
    assert steered_ratio(control, base_ratio=0.25, max_ratio=0.5) == 0.5
    # A scale, not a ratio: a schedule's later ratio is steered from its own value.
    assert steered_ratio(control, base_ratio=0.125, max_ratio=0.5) == 0.25
    [old, code] = control.decisions
    assert (old["action"], old["strata"], round(old["forgetting"], 3)) == (
        "raise", ["speeches/1790s.parquet"], 0.2)
    assert code["action"] == "lower"  # code is where it was: clearly under the budget


def test_under_the_budget_the_weights_and_ratio_come_back_down():
    history = [{"old_speeches": result(20.0), "code": result(10.0)}]
    raised = Control(ratio_scale=2.0, weights={"speeches/1790s.parquet": 2.25})
    control = step(raised, {"old_speeches": result(19.0), "code": result(9.5)}, history)
    assert control.weights == {"speeches/1790s.parquet": pytest.approx(1.5)}
    assert control.ratio_scale == pytest.approx(2.0 / 1.5)
    for _ in range(3):
        control = step(control, {"old_speeches": result(19.0), "code": result(9.5)}, history)
    assert control.weights == {} and control.ratio_scale == 1.0  # back to the config's
    assert steered_ratio(control, base_ratio=0.25, max_ratio=0.5) is None


def test_noise_holds_the_budget_still():
    """A 6 % rise measured on documents that vary a lot is not evidence of forgetting."""
    history = [{"old_speeches": result(20.0, noise=1.0, seed=1)}]
    control = step(Control(), {"old_speeches": result(21.2, noise=1.0, seed=2)}, history)
    assert control.decisions[0]["action"] == "hold" and control.weights == {}


def test_a_rejection_steers_and_retries_once_then_sets_the_rows_aside():
    first = after_gate(Control(), rejected=True, regressed=["old_speeches"], covers=COVERS,
                       strata=STRATA, max_ratio=0.5, base_ratio=0.25)
    assert (first.retry, first.rejections, first.lr_scale) == (True, 1, 0.5)
    assert first.weights == {"speeches/1790s.parquet": 1.5} and first.ratio_scale == 1.5
    second = after_gate(first, rejected=True, regressed=["old_speeches"], covers=COVERS,
                        strata=STRATA, max_ratio=0.5, base_ratio=0.25)
    assert (second.retry, second.rejections, second.lr_scale) == (False, 2, 0.25)
    accepted = after_gate(second, rejected=False, regressed=[], covers=COVERS, strata=STRATA,
                          max_ratio=0.5, base_ratio=0.25)
    assert (accepted.retry, accepted.rejections, accepted.lr_scale) == (False, 0, 0.5)
    assert accepted.ratio_scale == pytest.approx(second.ratio_scale / 1.5)  # recovering too


def test_the_state_round_trips_through_a_manifest():
    import json

    control = Control(ratio_scale=1.5, weights={"a/b": 1.5}, lr_scale=0.5, retry=True,
                      rejections=1, decisions=[{"set": "x", "action": "raise"}])
    assert Control.from_dict(json.loads(json.dumps(control.to_dict()))) == control


def test_covers_find_file_strata_named_groups_and_whole_sites():
    cover = Cover(site="speeches", files=["17*"])
    known = ["speeches/1790s.parquet", "speeches/1990s.parquet", "old_eras", "new_eras",
             "speeches", "code/01.jsonl"]
    groups = {"old_eras": ["speeches/17*", "speeches/18*"], "new_eras": ["speeches/19*"]}
    assert cover.strata(known, groups=groups) == ["speeches/1790s.parquet", "old_eras",
                                                  "speeches"]
    assert Cover(site="code").strata(known) == ["code/01.jsonl"]
    assert cover.strata([]) == ["speeches/17*"]  # strata on the workers: by name
