"""The continual-quality benchmark's stream and arms (its training runs are not part of the
suite: `python benchmarks/continual_quality.py --quick`)."""

import importlib.util
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location(
    "continual_quality", REPO / "benchmarks" / "continual_quality.py")
bench = importlib.util.module_from_spec(spec)
sys.modules["continual_quality"] = bench  # dataclasses look their module up
spec.loader.exec_module(bench)


def test_rows_are_cut_at_line_ends_without_losing_text():
    rows = ["a\nbb\nccc\n", "x" * 25, "short"]
    out = bench.pieces(rows, max_chars=10)
    assert all(len(p) <= 10 for p in out)
    assert "".join(out) == "".join(rows)


def test_spread_picks_first_and_last():
    assert bench.spread(list("abcdefg"), 3) == ["a", "d", "g"]


@pytest.fixture
def demo_like(tmp_path):
    for name in ("speeches", "code", "combined", "joint", "eval"):
        (tmp_path / name).mkdir()
    evals = {"era_a": bench.EvalSet(tmp_path / "eval", covers={"site": "speeches",
                                                                 "files": ["01.parquet"]}),
             "era_b": bench.EvalSet(tmp_path / "eval"),
             "code": bench.EvalSet(tmp_path / "eval", covers={"site": "code"},
                                   text_column="source")}
    return bench.Stream(sites={"speeches": tmp_path / "speeches", "code": tmp_path / "code"},
                        combined=tmp_path / "combined", shuffled=tmp_path / "joint",
                        eval=evals, newest=["era_b"], older=["era_a"], rounds=2)


def test_every_arm_gets_the_same_step_and_batch_budget(demo_like, tmp_path):
    size = bench.QUICK
    configs = {arm: bench.arm_config(arm, demo_like, tmp_path / "runs" / arm, size=size)
               for arm in bench.ARMS}
    budget = {arm: len(c.sites) * c.worker.local_steps * c.worker.batch_size * c.rounds
              for arm, c in configs.items()}
    assert len(set(budget.values())) == 1
    assert [c.replay.ratio > 0 for c in configs.values()] == [False, True, True, False]
    assert configs["naive"].worker.lr_schedule.kind == "constant"
    assert configs["tributary"].worker.lr_schedule.kind == "rewarm"
    assert [e.name for e in configs["joint"].eval if e.newest] == ["era_b"]
    # Only the budget arm steers replay, by the increments each eval set stands for.
    assert configs["budget"].replay.target_forgetting == bench.TARGET
    assert configs["tributary"].replay.target_forgetting is None
    covers = {e.name: e.covers for e in configs["budget"].eval}
    assert covers["era_a"].files == ["01.parquet"] and covers["era_b"] is None
    assert all(e.covers is None for e in configs["tributary"].eval)


def test_paired_ratios_are_taken_seed_by_seed():
    runs = {"naive": [{"forgetting": 0.2, "mean": 10, "gain": 0.5},
                      {"forgetting": 0.4, "mean": 10, "gain": 0.5}],
            "budget": [{"forgetting": 0.02, "mean": 10, "gain": 0.45},
                       {"forgetting": 0.08, "mean": 10, "gain": 0.5}]}
    lines = bench.ratio_lines(runs)
    assert "- forgetting, budget / naive: 0.150 ± 0.071" in lines  # (0.1, 0.2)
    assert "- newest gain, budget / naive: 0.950 ± 0.071" in lines


@pytest.mark.parametrize("domain", ["licenses", "factbook", "bible"])
def test_the_other_domains_ship_real_documents(domain):
    spec = importlib.util.spec_from_file_location("corpora", REPO / "benchmarks" / "corpora.py")
    corpora = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(corpora)
    docs = corpora.DOMAINS[domain](seed=1)
    assert len(docs) > 300 and sum(map(len, docs)) > 2_000_000
    assert docs != corpora.DOMAINS[domain](seed=2)  # each seed its own order
    assert sorted(docs) == sorted(corpora.DOMAINS[domain](seed=2))
