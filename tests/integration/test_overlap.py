"""run.overlap: version v is evaluated and written while the workers train round v+1, and
`latest` never points at a version before its evaluation is done."""

from __future__ import annotations

import threading

import pytest

from tests.helpers import tiny_config
from trainer.checkpoint import all_manifests, latest_version
from trainer.coordinator import Coordinator
from trainer.metrics import read_metrics

pytestmark = pytest.mark.integration


class WatchedCoordinator(Coordinator):
    """Version 1's evaluation waits until round 2 has been dispatched: without overlap the
    wait times out, since round 2 would only start after it."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.round_2_dispatched = threading.Event()
        self.latest_at_dispatch: dict[int, str] = {}
        self.eval_waited: bool | None = None

    def _dispatch(self, tasks, *, weights, base):
        answer = super()._dispatch(tasks, weights=weights, base=base)
        round_index = next(iter(tasks.values())).round_index
        self.latest_at_dispatch[round_index] = latest_version(self.run_dir).name
        if round_index == 2:
            self.round_2_dispatched.set()
        return answer

    def _evaluate(self):
        if self.state.version == 1 and self.eval_waited is None:
            self.eval_waited = self.round_2_dispatched.wait(timeout=120)
        return super()._evaluate()


def test_version_is_evaluated_and_written_while_the_next_round_trains(
        ray_cluster, demo_root, notes_site, tmp_path):
    run_dir = tmp_path / "run"
    coordinator = WatchedCoordinator(tiny_config(demo_root, notes_site, run_dir))
    try:
        coordinator.run()
    finally:
        coordinator.shutdown()
    assert coordinator.eval_waited is True  # v1 was evaluated after round 2 began
    # Round 2 started before v1 was evaluated, so `latest` was still v0 then.
    assert coordinator.latest_at_dispatch == {1: "v0000", 2: "v0000"}
    assert latest_version(run_dir).name == "v0002"
    manifests = all_manifests(run_dir)
    assert [m["round"] for m in manifests] == [0, 1, 2]
    assert all(m["eval"] for m in manifests)
    assert manifests[2]["parent"] == "v0001"
    assert manifests[1]["cursors"] != manifests[2]["cursors"]  # each took its own round's state
    assert [r["version"] for r in read_metrics(run_dir)] == ["v0000", "v0001", "v0002"]
