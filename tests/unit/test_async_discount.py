"""merge.mode async: the staleness discount reaches the outer step even for a buffer of one
update (a weighted average alone would normalise it away)."""

import pytest

from trainer.asynchronous import Arrival, _mean_discount
from workers.types import Cursor, WorkerUpdate


def arrival(*, tokens: float, staleness: int, exponent: float = 0.5) -> Arrival:
    update = WorkerUpdate(worker_id="a", round=1, delta={}, weight=tokens, consumed=(),
                          cursor=Cursor(), sequences=None)
    return Arrival(update, 0, staleness, (1 + staleness) ** -exponent, [], None)


def test_one_update_keeps_its_discount():
    assert _mean_discount([arrival(tokens=100, staleness=3)]) == pytest.approx(0.5)
    assert _mean_discount([arrival(tokens=100, staleness=0)]) == 1.0


def test_a_buffer_weighs_discounts_by_tokens():
    arrivals = [arrival(tokens=300, staleness=0), arrival(tokens=100, staleness=3)]
    assert _mean_discount(arrivals) == pytest.approx((300 * 1.0 + 100 * 0.5) / 400)
    weighed = [a.weighed().weight for a in arrivals]
    assert weighed == pytest.approx([300.0, 50.0])  # the average's own weights
