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
def stream(tmp_path):
    for name in ("speeches", "code", "stream", "joint", "eval"):
        (tmp_path / name).mkdir()
    evals = {"era_a": tmp_path / "eval", "era_b": tmp_path / "eval", "code": tmp_path / "eval"}
    return bench.Stream(sites={"speeches": tmp_path / "speeches", "code": tmp_path / "code"},
                        combined=tmp_path / "stream", shuffled=tmp_path / "joint", eval=evals,
                        newest="era_b")


def test_every_arm_gets_the_same_step_and_batch_budget(stream, tmp_path):
    size = bench.QUICK
    configs = {arm: bench.arm_config(arm, stream, tmp_path / "runs" / arm, size=size)
               for arm in bench.ARMS}
    budget = {arm: len(c.sites) * c.worker.local_steps * c.worker.batch_size * c.rounds
              for arm, c in configs.items()}
    assert len(set(budget.values())) == 1
    assert [c.replay.ratio > 0 for c in configs.values()] == [False, True, False, True]
    assert configs["naive"].worker.lr_schedule.kind == "constant"
    assert configs["tributary"].worker.lr_schedule.kind == "rewarm"
    assert [e.name for e in configs["joint"].eval if e.newest] == ["era_b"]
