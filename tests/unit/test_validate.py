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
