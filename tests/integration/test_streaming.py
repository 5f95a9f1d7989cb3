"""A watched site: increments pushed while the run goes are trained in later rounds, in order,
each row exactly once; `rounds: null` runs until SIGTERM, which finishes the round and exits
cleanly; `resume` carries on with what arrived meanwhile. On folders nobody watches it stops
once their rows are trained."""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pytest
import ray

from tests.helpers import assert_rows_exactly_once, tiny_config
from trainer.checkpoint import all_manifests
from trainer.config import dump_config
from trainer.coordinator import run_training
from trainer.metrics import read_metrics
from workers.increments import IncrementError, push_increment

pytestmark = pytest.mark.integration


def paragraphs(notes_site: Path, start: int, count: int) -> pa.Table:
    """Real text for the pushes: speech paragraphs from the notes site's files."""
    import json

    rows = [json.loads(line)["body"] for f in sorted(notes_site.glob("*.jsonl"))
            for line in f.read_text().splitlines()]
    return pa.table({"body": rows[start:start + count]})


def trained_files(run_dir: Path, site: str) -> list[str]:
    names = []
    for manifest in all_manifests(run_dir, include_rejected=True):
        for r in manifest["increments"].get(site, []):
            if Path(r["file"]).name not in names:
                names.append(Path(r["file"]).name)
    return names


def wait_for(predicate, *, timeout_s: float, what: str, proc=None, log: Path | None = None
             ) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if proc is not None and proc.poll() is not None:
            tail = log.read_text()[-3000:] if log is not None else ""
            raise AssertionError(f"the run exited ({proc.returncode}) while waiting for {what}"
                                 f"\n{tail}")
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.5)


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_watched_site_trains_pushed_increments_and_stops_cleanly_on_sigterm(
        ray_cluster, demo_root, notes_site, tmp_path, mode):
    """In async mode the speeches site keeps training while notes waits for files."""
    stream = tmp_path / "stream"
    run_dir = tmp_path / "run"
    first = push_increment(stream, paragraphs(notes_site, 0, 4), text_column="body")
    config = tiny_config(demo_root, notes_site, run_dir, **{
        "rounds": "null", "run.poll_s": 1, "run.overlap": False, "merge.mode": mode,
        "sites.notes.path": str(stream), "sites.notes.watch": True,
        "sites.notes.settle_s": 0.5})
    config_path = tmp_path / "config.yaml"
    dump_config(config, config_path)
    env = dict(os.environ, RAY_ADDRESS=ray.get_runtime_context().gcs_address)
    # The run's output goes to a file: a pipe nobody reads while the test waits would fill
    # (64 KiB) and block the run mid-write.
    log_path = tmp_path / "run.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "trainer", "run", str(config_path)],
                                env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: Path(first).name in trained_files(run_dir, "notes"), timeout_s=300,
                 what="the first increment", proc=proc, log=log_path)
        pushed = [push_increment(stream, paragraphs(notes_site, 4 + 3 * i, 3), text_column="body")
                  for i in range(2)]
        wait_for(lambda: Path(pushed[-1]).name in trained_files(run_dir, "notes"),
                 timeout_s=300, what="the pushed increments", proc=proc, log=log_path)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    output = log_path.read_text()
    assert proc.returncode == 0, output[-3000:]
    assert "Stopped by SIGTERM" in output
    assert trained_files(run_dir, "notes") == [Path(p).name for p in [first, *pushed]]
    stopped_at = all_manifests(run_dir)[-1]["round"]
    assert [r["round"] for r in read_metrics(run_dir)] == list(range(stopped_at + 1))

    late = push_increment(stream, paragraphs(notes_site, 10, 2), text_column="body")
    # Async: the other site may publish a few versions before the notes update lands.
    more = 3 if mode == "sync" else 8
    resumed = subprocess.run([sys.executable, "-m", "trainer", "resume", str(run_dir), "--set",
                              f"rounds={stopped_at + more}"], env=env, capture_output=True,
                             text=True, timeout=600, check=False)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert trained_files(run_dir, "notes") == [Path(p).name for p in [first, *pushed, late]]
    assert_rows_exactly_once(run_dir, "notes", text_column="body")


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_run_until_stopped_ends_when_its_folders_run_out_not_a_poll_later(
        ray_cluster, demo_root, notes_site, tmp_path, capsys, mode):
    """`rounds: null` on a folder nobody watches: once every row is trained the run stops at
    once (a sync run used to wait out one `run.poll_s` first, saying it was waiting)."""
    run_dir = tmp_path / "run"
    config = tiny_config(demo_root, notes_site, run_dir, **{
        "rounds": "null", "run.poll_s": 900, "merge.mode": mode})
    config = dataclasses.replace(config, sites=[s for s in config.sites if s.name == "notes"])
    started = time.monotonic()
    run_training(config)
    elapsed = time.monotonic() - started
    output = capsys.readouterr().out
    assert "No site has rows left" in output
    assert "waiting" not in output
    assert elapsed < 900, f"the run took {elapsed:.0f} s: it waited out run.poll_s"
    assert_rows_exactly_once(run_dir, "notes", text_column="body")


def test_push_refuses_an_empty_or_textless_table(tmp_path):
    with pytest.raises(IncrementError, match="empty increment"):
        push_increment(tmp_path, pa.table({"text": pa.array([], pa.string())}))
    with pytest.raises(IncrementError, match="string column 'text'"):
        push_increment(tmp_path, pa.table({"body": ["x"]}))
    assert list(tmp_path.iterdir()) == []
