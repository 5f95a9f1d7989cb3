"""Update validation: wrong layout, NaN/Inf and outsized norms are rejected with a reason."""

import numpy as np
import pyarrow as pa

from trainer.validate import delta_norm, validate_updates
from workers.types import Cursor, WorkerUpdate

SHAPES = {"w": (2, 2), "b": (2,)}


def update(site: str, scale: float = 1.0, **delta) -> WorkerUpdate:
    base = {"w": np.full((2, 2), scale, np.float32), "b": np.full(2, scale, np.float32)}
    base.update(delta)
    return WorkerUpdate(worker_id=site, round=1, delta=base, weight=10.0, consumed=(),
                        cursor=Cursor(), sequences=pa.table({}))


def test_good_updates_pass():
    accepted, rejected = validate_updates([update("a"), update("b", 1.5)], shapes=SHAPES,
                                          max_norm_ratio=10)
    assert [u.worker_id for u in accepted] == ["a", "b"] and rejected == {}


def test_nan_inf_and_layout_are_rejected_with_reasons():
    bad = [update("nan", w=np.array([[np.nan, 0], [0, 0]], np.float32)),
           update("inf", b=np.array([np.inf, 0], np.float32)),
           update("shape", b=np.zeros(3, np.float32)),
           update("ok")]
    del bad[2].delta["w"]
    accepted, rejected = validate_updates(bad, shapes=SHAPES, max_norm_ratio=10)
    assert [u.worker_id for u in accepted] == ["ok"]
    assert "NaN or Inf" in rejected["nan"] and "NaN or Inf" in rejected["inf"]
    assert "missing ['w']" in rejected["shape"]


def test_outsized_norm_is_rejected_against_the_median_of_the_others():
    updates = [update("a", 1.0), update("b", 1.2), update("huge", 1000.0)]
    accepted, rejected = validate_updates(updates, shapes=SHAPES, max_norm_ratio=10)
    assert [u.worker_id for u in accepted] == ["a", "b"]
    assert "merge.max_norm_ratio=10" in rejected["huge"]
    # With two workers, the normal one is never rejected for being small.
    accepted, rejected = validate_updates([update("a"), update("huge", 1000.0)], shapes=SHAPES,
                                          max_norm_ratio=10)
    assert list(rejected) == ["huge"]


def test_delta_norm():
    assert abs(delta_norm({"x": np.array([3.0, 4.0], np.float32)}) - 5.0) < 1e-6


# ---------------------------------------------------------------- self-reports against the plan


def honest(**changes) -> WorkerUpdate:
    """A report of 3 steps on 600 new tokens, continuing at row 4 token 50 of b.jsonl and
    crossing into c.jsonl."""
    from workers.increments import cursor_after
    from workers.packing import pack_stream
    from workers.types import RowRange

    consumed = (RowRange("b.jsonl", 4, 9, start_token=50), RowRange("c.jsonl", 0, 2,
                                                                    end_token=7))
    previous = Cursor("b.jsonl", 4, token=50, steps=5, run_steps=20)
    sequences = pack_stream(list(range(600)), seq_len=64, pad_id=0)
    fields = {"worker_id": "a", "round": 3, "delta": {}, "weight": 600.0, "consumed": consumed,
              "sequences": sequences, "metrics": {"new_tokens": 600, "epochs": 1, "steps": 3}}
    fields.update(changes)
    fields.setdefault("cursor", cursor_after(fields["consumed"], previous,
                                             steps=fields["metrics"]["steps"]))
    return WorkerUpdate(**fields)


def problem(update: WorkerUpdate, **plan) -> str | None:
    from trainer.validate import report_problem

    settings = {"previous": Cursor("b.jsonl", 4, token=50, steps=5, run_steps=20),
                "budget": 768, "local_steps": 3, "max_epochs": 1,
                "listed": {"a.jsonl", "b.jsonl", "c.jsonl"}, "shared_sequences": True}
    settings.update(plan)
    return report_problem(update, **settings)


def test_an_honest_report_fits_its_plan():
    assert problem(honest()) is None
    assert problem(honest(), listed=None) is None  # the coordinator cannot list: not checked


def test_reports_that_claim_more_than_the_plan_are_refused():
    from workers.types import RowRange

    inflated = honest(weight=60_000.0, metrics={"new_tokens": 60_000, "epochs": 1, "steps": 3})
    assert "planned for at most 768" in problem(inflated)
    assert "not its new tokens × passes" in problem(honest(weight=6000.0))
    extra_passes = honest(weight=1200.0, metrics={"new_tokens": 600, "epochs": 2, "steps": 6})
    assert "passes" in problem(extra_passes)
    lying = honest(metrics={"new_tokens": 700, "epochs": 1, "steps": 3}, weight=700.0)
    assert "sent sequences holding 600" in problem(lying)
    assert problem(lying, shared_sequences=False) is None  # site replay: nothing to count
    backwards = honest(consumed=(RowRange("a.jsonl", 0, 3),))
    assert "do not continue from" in problem(backwards)
    gap = honest(consumed=(RowRange("b.jsonl", 6, 9),))
    assert "do not continue from" in problem(gap)
    unknown = honest(consumed=(RowRange("b.jsonl", 4, 9, start_token=50),
                               RowRange("z.jsonl", 0, 2)))
    assert "not among the site's files" in problem(unknown)
    assert "is not where its rows end" in problem(honest(cursor=Cursor("c.jsonl", 40)))
