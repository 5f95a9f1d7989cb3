"""A worker's committed states: `round-NNNN/` folders (optimizer moments, RNG states, the
compression residual, a site-local replay store), each written atomically, kept as long as
the versions' weights are (run.keep_versions).
With a run directory on an object store each is also published there (its completion marker
written last) and fetched back by a worker that starts on a node without it."""

from __future__ import annotations

import shutil
import threading
from collections.abc import Callable
from pathlib import Path

from workers.fsio import atomic_dir
from workers.storage import delete_tree, fetch_published, join, list_names, publish_folder


class StateStore:
    def __init__(self, folder: str | None, *, uri: str | None = None,
                 keep: int | None = None) -> None:
        self.folder = Path(folder) if folder else None
        self.uri = uri
        self.keep = keep  # the newest `keep` states stay (None: all), as versions' weights do

    def save(self, round_index: int, write: Callable[[Path], None]) -> None:
        """`write(folder)` fills the state of `round_index`; it appears whole or not at all."""
        if self.folder is None:
            return
        final = self.folder / _name(round_index)
        with atomic_dir(final) as tmp:
            write(tmp)
        for old in self._local()[:-self.keep] if self.keep else []:
            shutil.rmtree(old, ignore_errors=True)
        if self.uri is not None:
            publish_folder(final, join(self.uri, final.name))
            for old in self._published()[:-self.keep] if self.keep else []:
                delete_tree(join(self.uri, old))

    def discard_after(self, round_index: int) -> None:
        """Drop states committed after `round_index`: work a resume or a rollback went back
        from, which would otherwise count as the newest and push the states to come out."""
        if self.folder is None:
            return
        for newer in [p for p in self._local() if _number(p.name) > round_index]:
            shutil.rmtree(newer, ignore_errors=True)
        if self.uri is not None:
            for newer in [n for n in self._published() if _number(n) > round_index]:
                delete_tree(join(self.uri, newer))

    def newest(self, round_index: int) -> Path | None:
        """The newest state committed at or before `round_index` (a site that sat out later
        rounds last trained earlier), fetched from the URI if this node lacks it."""
        if self.folder is None:
            return None
        if self.uri is not None:
            self._fetch(round_index)
        saved = [p for p in self._local() if _number(p.name) <= round_index]
        return saved[-1] if saved else None

    def _local(self) -> list[Path]:
        """Committed states here, oldest first (by number: round-10000 after round-9999)."""
        if not self.folder.is_dir():
            return []
        return sorted((p for p in self.folder.glob("round-*") if p.is_dir()),
                      key=lambda p: _number(p.name))

    def _published(self) -> list[str]:
        return sorted((n for n in list_names(self.uri) if n.startswith("round-")), key=_number)

    def _fetch(self, round_index: int) -> None:
        names = [n for n in self._published() if _number(n) <= round_index]
        for name in reversed(names):  # the newest one that was published whole
            if (self.folder / name).is_dir():
                return
            if fetch_published(join(self.uri, name), self.folder / name):
                return


class StateWriter:
    """Saves committed states on a thread, one at a time and in order, so the next round
    trains while the last one's state is written and fsynced. `durable(r)` waits until state
    r is on disk; a save that failed raises at the next `save` or `wait`, and at `durable`."""

    def __init__(self, store: StateStore) -> None:
        self.store = store
        self.thread: threading.Thread | None = None
        self.saving: int | None = None  # the round being written
        self.error: BaseException | None = None
        self.failed: int | None = None  # the round whose save raised `error`
        self.changed = threading.Condition()

    def save(self, round_index: int, write: Callable[[Path], None], *, background: bool) -> None:
        self.wait()
        if not background:
            self.store.save(round_index, write)
            return
        with self.changed:
            self.saving = round_index
        self.thread = threading.Thread(target=self._run, args=(round_index, write),
                                       name=f"save-{_name(round_index)}", daemon=True)
        self.thread.start()

    def _run(self, round_index: int, write: Callable[[Path], None]) -> None:
        try:
            self.store.save(round_index, write)
        except BaseException as exc:  # noqa: BLE001 - raised to the caller by wait/durable
            with self.changed:
                self.error, self.failed = exc, round_index
        with self.changed:
            self.saving = None
            self.changed.notify_all()

    def wait(self) -> None:
        """The save in progress finished; its error, if any, raised."""
        if self.thread is not None:
            self.thread.join()
            self.thread = None
        if self.error is not None:
            error, self.error, self.failed = self.error, None, None
            raise RuntimeError(f"saving the worker's state failed: {error}") from error

    def durable(self, round_index: int) -> None:
        """Return once state `round_index` is written (at once if it is not being written)."""
        with self.changed:
            self.changed.wait_for(lambda: self.saving != round_index)
            if self.failed == round_index:
                raise RuntimeError(f"saving the worker's state of {_name(round_index)} "
                                   f"failed: {self.error}")


def _name(round_index: int) -> str:
    return f"round-{round_index:04d}"


def _number(name: str) -> int:
    return int(name.split("-")[1])
