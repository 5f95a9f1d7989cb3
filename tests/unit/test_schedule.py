"""The learning-rate schedule across increments, and how a site's cursor carries its phase."""

import pytest

from workers.increments import cursor_after, increment_step
from workers.schedule import LrSchedule, lr_at
from workers.types import Cursor, RowRange

REWARM = LrSchedule(kind="rewarm", warmup_steps=2, decay_steps=4, min_lr_ratio=0.1)


def test_rewarm_warms_up_decays_to_the_floor_and_stays():
    lrs = [lr_at(REWARM, peak=1.0, increment_step=i, run_step=100 + i) for i in range(9)]
    assert lrs[0] == pytest.approx(0.55)  # halfway from the floor to the peak
    assert lrs[1] == pytest.approx(1.0)  # warm-up done: the peak
    assert lrs[1:7] == sorted(lrs[1:7], reverse=True)  # cosine re-decay
    assert lrs[6:] == pytest.approx([0.1] * 3)  # the floor until the next increment


def test_constant_warms_up_once_per_run_not_per_increment():
    schedule = LrSchedule(kind="constant", warmup_steps=4)
    assert lr_at(schedule, peak=2.0, increment_step=0, run_step=1) == pytest.approx(1.0)
    assert lr_at(schedule, peak=2.0, increment_step=0, run_step=4) == 2.0  # new file, no re-warm
    assert lr_at(LrSchedule(), peak=2.0, increment_step=0, run_step=0) == 2.0


def test_cursor_carries_the_phase_within_a_file_and_resets_on_a_new_one():
    start = Cursor()
    first = cursor_after((RowRange("a", 0, 5),), start, steps=3)
    assert (first.steps, first.run_steps) == (3, 3)
    assert increment_step(first, first_file="a") == 3  # the next round continues file a
    second = cursor_after((RowRange("a", 5, 9),), first, steps=3)
    assert (second.steps, second.run_steps) == (6, 6)
    assert increment_step(second, first_file="b") == 0  # a round that begins file b re-warms
    crossed = cursor_after((RowRange("a", 9, 12), RowRange("b", 0, 2)), second, steps=2)
    # b began mid-round: its phase starts at 0 in the next round, which begins inside b.
    assert (crossed.file, crossed.steps, crossed.run_steps) == ("b", 0, 8)
    assert increment_step(crossed, first_file="b") == 0
