"""A worker's committed states: the newest kept by number (not by name), states after a
restore point dropped, so later saves are not pruned in their favour; written on a thread,
with `durable` saying when one is on disk."""

import threading
from pathlib import Path

import pytest

from workers.state import StateStore, StateWriter


def save(store: StateStore, round_index: int) -> None:
    store.save(round_index, lambda folder: (folder / "moments").write_text(str(round_index)))


def kept(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.glob("round-*"))


def test_past_round_9999_the_newest_states_are_kept(tmp_path):
    store = StateStore(str(tmp_path), keep=2)  # run.keep_versions: 2
    for index in (9998, 9999, 10000):
        save(store, index)
    assert kept(tmp_path) == ["round-10000", "round-9999"]
    assert store.newest(20000).name == "round-10000"
    every = StateStore(str(tmp_path / "all"))  # keep_versions unset: every state stays
    for index in (1, 2, 3):
        save(every, index)
    assert kept(tmp_path / "all") == ["round-0001", "round-0002", "round-0003"]


def test_states_after_a_restore_point_are_dropped(tmp_path):
    store = StateStore(str(tmp_path))
    for index in (5, 7):  # 7: a task whose version a resume superseded
        save(store, index)
    store.discard_after(5)
    assert kept(tmp_path) == ["round-0005"]
    save(store, 6)  # the site's next task after the resume
    assert kept(tmp_path) == ["round-0005", "round-0006"]
    assert (tmp_path / "round-0006" / "moments").read_text() == "6"


def test_a_state_is_written_on_a_thread_and_durable_says_when_it_is_on_disk(tmp_path):
    writer = StateWriter(StateStore(str(tmp_path)))
    release = threading.Event()

    def slow(folder):
        release.wait(5)
        (folder / "moments").write_text("state of round 1")

    writer.save(1, slow, background=True)  # returns while the write waits
    assert not (tmp_path / "round-0001").exists()
    done = threading.Thread(target=writer.durable, args=(1,))
    done.start()
    done.join(0.2)
    assert done.is_alive()  # durable waits for the write
    release.set()
    done.join(5)
    assert (tmp_path / "round-0001" / "moments").read_text() == "state of round 1"
    writer.durable(7)  # a round not being written: at once


def test_a_failed_background_save_raises_at_durable_and_at_the_next_save(tmp_path):
    writer = StateWriter(StateStore(str(tmp_path)))

    def broken(folder):
        raise OSError("disk full")

    writer.save(2, broken, background=True)
    with pytest.raises(RuntimeError, match="round-0002 failed: disk full"):
        writer.durable(2)
    with pytest.raises(RuntimeError, match="disk full"):
        writer.save(3, lambda folder: None, background=True)
    assert not (tmp_path / "round-0002").exists()  # nothing half-written is left
