"""One writer per run folder: `run`, `resume` and `retract` hold RUN_DIR/writer.lock while they
change the run. The lock names its holder (host, pid, what it does) and is refreshed every few
seconds while the holder lives; a second writer is refused with a message naming the holder.
A holder that is gone — its process no longer exists on this host, or, on another host (a
shared filesystem), it stopped refreshing — is detected, and the lock taken over with a
warning."""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import ClassVar, Self

log = logging.getLogger(__name__)
LOCK = "writer.lock"
BEAT_S = 5.0  # how often a holder refreshes the lock
STALE_S = 60.0  # a holder on another host that has not refreshed for this long is gone


class RunLocked(RuntimeError):
    """Another live process writes this run."""


@dataclass(frozen=True)
class Holder:
    host: str
    pid: int
    role: str  # run, resume or retract
    since: float  # time.time() when it took the lock
    beat: float  # time.time() of its last refresh

    @classmethod
    def me(cls, role: str) -> Holder:
        now = time.time()
        return cls(socket.gethostname(), os.getpid(), role, now, now)

    def is_me(self) -> bool:
        return self.host == socket.gethostname() and self.pid == os.getpid()

    def alive(self, *, stale_s: float = STALE_S) -> bool:
        if self.host != socket.gethostname():  # only its refreshes can tell
            return time.time() - self.beat < stale_s
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True  # another user's live process
        return True

    def describe(self) -> str:
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.since))
        return f"`{self.role}` (pid {self.pid} on {self.host}, since {started})"


def holder(run_dir: Path) -> Holder | None:
    """Who holds the run's lock (alive or not), or None."""
    try:
        return Holder(**json.loads((Path(run_dir) / LOCK).read_text()))
    except FileNotFoundError:
        return None
    except (ValueError, TypeError):  # being written this instant: ask again
        time.sleep(0.1)
        return holder(run_dir)


class RunLock:
    """`with RunLock(run_dir, role="run"):` the only writer of the run while the block runs.
    Re-entrant within one process (a retraction's continuation runs inside it)."""

    held: ClassVar[dict[Path, int]] = {}  # lock files this process holds, and how deeply

    def __init__(self, run_dir: Path, *, role: str, beat_s: float = BEAT_S,
                 stale_s: float = STALE_S) -> None:
        self.path = Path(run_dir).resolve() / LOCK
        self.role, self.beat_s, self.stale_s = role, beat_s, stale_s
        self.done = threading.Event()
        self.thread: threading.Thread | None = None

    def __enter__(self) -> Self:
        if self.held.get(self.path):
            self.held[self.path] += 1
            return self
        self._acquire()
        self.held[self.path] = 1
        self.thread = threading.Thread(target=self._refresh, name="run-lock", daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.held[self.path] -= 1
        if self.held[self.path]:
            return
        del self.held[self.path]
        self.done.set()
        self.thread.join()
        current = holder(self.path.parent)
        if current is not None and current.is_me():
            self.path.unlink(missing_ok=True)

    def _acquire(self) -> None:
        me = Holder.me(self.role)
        try:
            with os.fdopen(os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY), "w") as f:
                f.write(json.dumps(asdict(me)))
            return
        except FileExistsError:
            pass
        other = holder(self.path.parent)
        if other is not None and other.alive(stale_s=self.stale_s):
            raise RunLocked(
                f"{self.path.parent} is being written by {other.describe()}; one process at "
                f"a time may change a run. Wait for it to end (or stop it), then try again")
        if other is not None:
            log.warning("%s: its holder %s is gone; taking the lock over", self.path,
                        other.describe())
        self._write(me)
        taker = holder(self.path.parent)
        if taker is None or not taker.is_me():  # another taker came in between
            raise RunLocked(f"{self.path.parent} was just taken over by "
                            f"{taker.describe() if taker else 'another process'}")

    def _write(self, me: Holder) -> None:
        tmp = self.path.with_name(f".{LOCK}.{os.getpid()}")
        tmp.write_text(json.dumps(asdict(me)))
        os.replace(tmp, self.path)

    def _refresh(self) -> None:
        while not self.done.wait(self.beat_s):
            current = holder(self.path.parent)
            if current is None or not current.is_me():
                log.error("%s: the lock is no longer this process's (%s)", self.path,
                          current.describe() if current else "removed")
                return
            self._write(Holder(current.host, current.pid, current.role, current.since,
                               time.time()))
