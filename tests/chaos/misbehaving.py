"""Workers that misbehave on purpose: poisoned, slow, failing or noisy updates.
The tests ship these classes to Ray workers by value (this module is not installed)."""

from __future__ import annotations

import dataclasses

import numpy as np

from workers.compression import unpack_delta
from workers.worker import Worker


def poisoned_worker(*, site: str, round_index: int, kind: str) -> type:
    """A Worker class whose `site` sends a bad delta in `round_index` (kind: nan | huge)."""

    class PoisonWorker(Worker):
        def train_round(self, task, weights, base=None):
            update = super().train_round(task, weights, base)
            round_index = task.round_index
            if self.site.name != site or round_index != poison_round:
                return update
            if kind == "nan":
                delta = {k: np.full_like(v, np.nan) for k, v in update.delta.items()}
            else:
                delta = {k: v * 1e6 for k, v in update.delta.items()}
            return dataclasses.replace(update, delta=delta)

    poison_round = round_index
    return PoisonWorker


def slow_worker(*, site: str, round_index: int, seconds: float) -> type:
    """A Worker class whose `site` takes `seconds` longer in `round_index` (a straggler)."""

    class SlowWorker(Worker):
        def train_round(self, task, weights, base=None):
            if self.site.name == site and task.round_index == slow_round:
                import time
                time.sleep(seconds)
            return super().train_round(task, weights, base)

    slow_round = round_index
    return SlowWorker


def failing_worker(*, site: str) -> type:
    """A Worker class whose `site` raises in every round (a site that stays broken)."""

    class FailingWorker(Worker):
        def train_round(self, task, weights, base=None):
            if self.site.name == site:
                raise RuntimeError(f"site {site} is broken")
            return super().train_round(task, weights, base)

    return FailingWorker


def unsaved_worker(*, site: str, round_index: int) -> type:
    """A Worker class whose `site` cannot commit its state of `round_index` (a full disk):
    the commit raises after the update was merged."""

    class UnsavedWorker(Worker):
        def commit(self, *, round_index: int) -> None:
            if self.site.name == site and round_index == unsaved_round:
                raise OSError(28, "No space left on device (injected)")
            super().commit(round_index=round_index)

    unsaved_round = round_index
    return UnsavedWorker


def noisy_worker(*, round_index: int | None, scale: float) -> type:
    """A Worker class whose every site adds Gaussian noise (std `scale`) to its delta in
    `round_index` (None: every round): finite, of similar norm across sites, and harmful to
    the model."""

    class NoisyWorker(Worker):
        def train_round(self, task, weights, base=None):
            update = super().train_round(task, weights, base)
            round_index = task.round_index
            if noisy_round not in (None, round_index) or not update.delta:
                return update
            rng = np.random.default_rng(round_index)
            delta = {k: v + rng.normal(0, scale, v.shape).astype(np.float32)
                     for k, v in unpack_delta(update.delta).items()}  # compressed or not
            return dataclasses.replace(update, delta=delta)

    noisy_round = round_index
    return NoisyWorker


def gated_worker(*, site: str, round_index: int, folder: str) -> type:
    """A Worker class whose `site`, at `round_index`, says so (file `started` in `folder`)
    and waits for file `go` before reading its rows; when its round returns it writes
    `returned` holding "sat out" or "trained". The test uses it to take storage down at that
    exact moment."""

    class GatedWorker(Worker):
        def train_round(self, task, weights, base=None):
            import time
            from pathlib import Path

            gate = Path(gate_folder)
            if self.site.name != site or task.round_index != gated_round:
                return super().train_round(task, weights, base)
            (gate / "started").write_text("")
            deadline = time.monotonic() + 300
            while not (gate / "go").exists() and time.monotonic() < deadline:
                time.sleep(0.1)
            answer = super().train_round(task, weights, base)
            sat_out = getattr(answer, "unavailable", None)
            (gate / "returned").write_text("sat out" if sat_out else "trained")
            return answer

    gated_round, gate_folder = round_index, folder
    return GatedWorker


def boasting_worker(*, site: str, round_index: int, factor: float) -> type:
    """A Worker class whose `site` claims `factor` × the tokens it trained in `round_index`
    (and weighs its update accordingly), as a site trying to dominate the merge would."""

    class BoastingWorker(Worker):
        def train_round(self, task, weights, base=None):
            update = super().train_round(task, weights, base)
            round_index = task.round_index
            if self.site.name != site or round_index != boast_round or not update.weight:
                return update
            claimed = int(update.metrics["new_tokens"] * factor)
            return dataclasses.replace(update, weight=float(claimed * update.metrics["epochs"]),
                                       metrics={**update.metrics, "new_tokens": claimed})

    boast_round = round_index
    return BoastingWorker


def paced_worker(*, site: str, seconds: float, first_only: bool = False) -> type:
    """A Worker class whose `site` takes `seconds` longer in every task (a slow site next to
    fast ones), or only in the first task its actor trains (`first_only`)."""

    class PacedWorker(Worker):
        def train_round(self, task, weights, base=None):
            if self.site.name == site and not (first_only and getattr(self, "paced", False)):
                import time
                time.sleep(seconds)
                self.paced = True
            return super().train_round(task, weights, base)

    return PacedWorker


def recording_worker(*, folder: str, fail_site: str, fail_round: int) -> type:
    """A Worker class that appends, for every task, a digest of the global weights it holds
    after taking in what the coordinator sent (merge.downlink) and the bytes that took, to
    `folder`/SITE.jsonl; `fail_site` raises after training its task `fail_round` (its
    workers are replaced, holding nothing)."""
    import json
    from pathlib import Path

    from workers.downlink import FullCopy, HeldWeights, weights_digest

    class RecordingHeld(HeldWeights):
        def __init__(self, site: str) -> None:
            super().__init__()
            self.site, self.round = site, 0

        def receive(self, payload):
            weights, received = super().receive(payload)
            record = {"task": self.round, "digest": weights_digest(weights),
                      "names": sorted(weights), "bytes": received,
                      "full": isinstance(payload, FullCopy),
                      "changes": len(getattr(payload, "changes", ()))}
            with (Path(folder) / f"{self.site}.jsonl").open("a") as out:
                out.write(json.dumps(record) + "\n")
            return weights, received

    class RecordingWorker(Worker):
        def __init__(self, **kwargs) -> None:
            super().__init__(**kwargs)
            self.held = RecordingHeld(self.site.name)

        def train_round(self, task, weights, base=None):
            self.held.round = task.round_index
            update = super().train_round(task, weights, base)
            if self.site.name == fail_site and task.round_index == fail_round:
                raise RuntimeError("injected failure after training")
            return update

    return RecordingWorker


def rank_killing_worker(*, site: str, rank: int, round_index: int, folder: str) -> type:
    """A Worker class whose `site`'s rank `rank` SIGKILLs its own process as its round
    `round_index` starts, once (a marker in `folder` remembers): a node or GPU lost under
    one rank of a multi-rank site, once the state of its last round is on disk."""

    class RankKillingWorker(Worker):
        def train_round(self, task, weights, base=None):
            import os
            import signal
            from pathlib import Path

            marker = Path(marker_folder) / f"killed-{site}-rank{rank}"
            if (self.site.name, self.group.rank, task.round_index) == (site, rank, kill_round) \
                    and not marker.exists():
                self.state_writer.wait()
                marker.write_text(str(os.getpid()))
                os.kill(os.getpid(), signal.SIGKILL)
            return super().train_round(task, weights, base)

    kill_round, marker_folder = round_index, folder
    return RankKillingWorker
