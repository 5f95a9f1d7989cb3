"""One writer per run folder: a live holder (another process) refuses a second writer by name,
a dead one is taken over with a warning, a holder on another host counts as alive while it
refreshes the lock, and `retract` stops waiting for a run that died."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import time
from dataclasses import asdict

import pytest

from trainer.runlock import LOCK, Holder, RunLock, RunLocked, holder

HOLD = """
import sys, time
from trainer.runlock import RunLock
with RunLock(sys.argv[1], role="run", beat_s=0.2):
    print("held", flush=True)
    time.sleep(600)
"""


@pytest.fixture
def other_process(tmp_path):
    """Another process holding tmp_path's lock, as `tributary run` would."""
    process = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)],
                               stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "held"
    yield process
    process.kill()
    process.wait()


def test_a_live_holder_refuses_a_second_writer_by_name(tmp_path, other_process):
    refused = rf"being written by `run` \(pid {other_process.pid} "
    with pytest.raises(RunLocked, match=refused), RunLock(tmp_path, role="resume"):
        pass
    first = holder(tmp_path).beat
    time.sleep(0.6)
    assert holder(tmp_path).beat > first  # refreshed while it lives


def test_a_dead_holder_is_taken_over_with_a_warning(tmp_path, other_process, caplog):
    other_process.kill()  # SIGKILL: the lock file stays behind
    other_process.wait()
    assert holder(tmp_path).pid == other_process.pid
    with caplog.at_level(logging.WARNING), RunLock(tmp_path, role="retract"):
        assert holder(tmp_path).is_me() and holder(tmp_path).role == "retract"
    assert f"pid {other_process.pid}" in caplog.text and "taking the lock over" in caplog.text
    assert not (tmp_path / LOCK).exists()  # released at the end


def test_a_holder_on_another_host_is_alive_while_it_refreshes(tmp_path):
    now = time.time()
    fresh = Holder("elsewhere", 1, "run", now - 600, now - 5)
    (tmp_path / LOCK).write_text(json.dumps(asdict(fresh)))
    with pytest.raises(RunLocked, match="on elsewhere"), RunLock(tmp_path, role="run"):
        pass
    stale = Holder("elsewhere", 1, "run", now - 600, now - 300)
    (tmp_path / LOCK).write_text(json.dumps(asdict(stale)))
    with RunLock(tmp_path, role="run"):
        assert holder(tmp_path).is_me()


def test_the_lock_is_reentrant_within_one_process(tmp_path):
    with RunLock(tmp_path, role="run"), RunLock(tmp_path, role="retract"):
        assert holder(tmp_path).role == "run"
    assert holder(tmp_path) is None


def test_waiting_for_a_retraction_stops_when_the_run_dies(tmp_path, other_process):
    from trainer.retract import Record, wait_done

    Record(id="r0001", file="a.parquet", site=None, reason="test", restart_from="v0001",
           replaced=[], rounds=2, status="requested").save(tmp_path)
    other_process.kill()
    other_process.wait()
    with pytest.raises(RuntimeError, match="ended before it carried out retraction r0001"):
        wait_done(tmp_path, "r0001", poll_s=0.1)


def test_run_and_resume_take_the_lock_before_anything_starts(tmp_path, other_process,
                                                             demo_root, notes_site):
    from tests.helpers import tiny_config
    from trainer.coordinator import run_training

    config = tiny_config(demo_root, notes_site, tmp_path)
    with pytest.raises(RunLocked, match=f"pid {other_process.pid}"):
        run_training(config, resume=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == [LOCK]  # nothing else written
