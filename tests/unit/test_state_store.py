"""A worker's committed states: the newest kept by number (not by name), and states after a
restore point dropped, so later saves are not pruned in their favour."""

from pathlib import Path

from workers.state import KEEP_STATES, StateStore


def save(store: StateStore, round_index: int) -> None:
    store.save(round_index, lambda folder: (folder / "moments").write_text(str(round_index)))


def kept(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.glob("round-*"))


def test_past_round_9999_the_newest_states_are_kept(tmp_path):
    store = StateStore(str(tmp_path))
    for index in (9998, 9999, 10000):
        save(store, index)
    assert KEEP_STATES == 2 and kept(tmp_path) == ["round-10000", "round-9999"]
    assert store.newest(20000).name == "round-10000"


def test_states_after_a_restore_point_are_dropped(tmp_path):
    store = StateStore(str(tmp_path))
    for index in (5, 7):  # 7: a task whose version a resume superseded
        save(store, index)
    store.discard_after(5)
    assert kept(tmp_path) == ["round-0005"]
    save(store, 6)  # the site's next task after the resume
    assert kept(tmp_path) == ["round-0005", "round-0006"]
    assert (tmp_path / "round-0006" / "moments").read_text() == "6"
