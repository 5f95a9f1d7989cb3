"""Held-out evaluation: the loss is kept by document, and the bootstrap's standard error
agrees with what sampling theory says it should be."""

from __future__ import annotations

import math

import numpy as np
import pytest

from trainer.evaluate import EvalResult, _documents, change_bounds, log_stderr


def test_tokens_are_assigned_to_the_document_their_eos_ends():
    eos = 0
    ids = np.array([[5, 6, 0, 7], [8, 0, 9, 9]])
    lengths = np.array([4, 3])
    assert _documents(ids, lengths, eos_id=eos).tolist() == [[0, 0, 0, 1], [1, 1, 2, 2]]


def test_bootstrap_standard_error_matches_the_sampling_theory():
    """Documents of equal length: the log perplexity is the mean of the documents' mean NLL,
    so its standard error is their standard deviation over sqrt(n)."""
    rng = np.random.default_rng(1)
    tokens = np.full(400, 50.0)
    per_token = rng.normal(3.0, 0.4, 400)
    expected = per_token.std() / math.sqrt(400)
    assert log_stderr(per_token * tokens, tokens) == pytest.approx(expected, rel=0.15)
    assert log_stderr(per_token[:1] * 50, tokens[:1]) == 0.0  # one document: nothing to say


def test_a_paired_comparison_sees_a_small_shift_that_the_spread_would_hide():
    """The same documents under two versions: their shared difficulty cancels out."""
    rng = np.random.default_rng(2)
    tokens = np.full(60, 100.0)
    difficulty = rng.normal(3.0, 1.0, 60) * tokens  # documents differ a lot
    base = EvalResult(math.exp(difficulty.sum() / tokens.sum()), doc_nll=difficulty,
                      doc_tokens=tokens)
    shifted = difficulty + 0.03 * tokens  # every document 3 % worse in perplexity
    worse = EvalResult(math.exp(shifted.sum() / tokens.sum()), doc_nll=shifted,
                       doc_tokens=tokens)
    rise, low, high = change_bounds(worse, base, z=1.96)
    assert rise == pytest.approx(math.exp(0.03) - 1)
    assert 0 < low <= rise <= high  # sure of a rise, however much the documents differ
    assert log_stderr(difficulty, tokens) > 0.1  # unpaired, the spread is far larger


def test_a_diverged_model_gets_an_infinite_perplexity_and_the_gate_rejects_it():
    """A mean loss over ~709 nats overflows exp(): the candidate must be judged, not crash."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from trainer.evaluate import EvalSet, evaluate
    from trainer.quality import gate_problems

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(
        "llama", vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32))
    ids = np.random.default_rng(0).integers(1, 64, (4, 16))
    ids[:, 7] = 0  # EOS: two documents a row
    lengths = np.full(4, 16)
    data = EvalSet(name="held", ids=ids, lengths=lengths,
                   docs=_documents(ids, lengths, eos_id=0))
    healthy = evaluate(model, data)
    assert math.isfinite(healthy.perplexity)
    with torch.no_grad():
        model.lm_head.weight.mul_(1e5)  # what a diverged update looks like: enormous logits
    diverged = evaluate(model, data)
    assert diverged.perplexity == math.inf
    assert diverged.doc_nll.sum() / diverged.doc_tokens.sum() > 709
    (problem,) = gate_problems({"held": diverged}, [{"held": healthy}],
                               protected={"held": "best"}, max_regression=0.05, z=1.96)
    assert problem.startswith("held: perplexity inf is +inf%")


def test_a_rise_near_float_range_has_bounds_not_an_overflow():
    tokens = np.full(8, 10.0)
    base = EvalResult(math.exp(3.0), doc_nll=np.full(8, 30.0), doc_tokens=tokens)
    spread_out = np.array([6800.0, 7300.0, 6850.0, 7250.0, 6900.0, 7200.0, 6950.0, 7060.0])
    huge = EvalResult(math.exp(spread_out.sum() / tokens.sum()), doc_nll=spread_out,
                      doc_tokens=tokens)
    rise, low, high = change_bounds(huge, base, z=1.96)
    assert 0 < low <= rise <= high == math.inf
