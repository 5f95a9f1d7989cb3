"""metrics.jsonl survives a torn last line (a kill or a full disk in the middle of a write)."""

import json

import pytest

from trainer.metrics import MetricsLog, read_metrics


def test_a_torn_last_line_is_left_out_and_resume_rewrites_the_file(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text(json.dumps({"round": 0}) + "\n" + json.dumps({"round": 1}) + "\n"
                    + '{"round": 2, "eval_perpl')
    assert [r["round"] for r in read_metrics(tmp_path)] == [0, 1]
    MetricsLog.drop_after(tmp_path, round_index=1)  # what resume does
    assert path.read_text().splitlines() == ['{"round": 0}', '{"round": 1}']


def test_a_bad_line_before_the_last_is_an_error_naming_it(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"round": 0}\nnot json\n{"round": 2}\n')
    with pytest.raises(ValueError, match="metrics.jsonl: line 2 is not JSON"):
        read_metrics(tmp_path)
