"""Threads and signals of the coordinator's loop: a version written in the background, and
SIGTERM/SIGINT turned into "stop after this round"."""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading

log = logging.getLogger(__name__)


class StopSignal:
    """SIGTERM/SIGINT ask the run to stop after the round in progress (its version is merged,
    evaluated and written) instead of killing it; a second one stops at once. Only the main
    thread can take signals; a run on another thread (tests) keeps the default handlers."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.requested: str | None = None
        self.event = threading.Event()
        self.previous: dict = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame) -> None:
        if self.requested:  # asked twice: stop now (the last complete version stays)
            raise KeyboardInterrupt(f"{signal.Signals(signum).name} again")
        self.requested = signal.Signals(signum).name
        self.event.set()
        log.warning("%s: finishing the round in progress, then stopping", self.requested)

    def ask(self, reason: str) -> None:
        """Stop after the round in progress, for `reason` (a retraction asked for a pause)."""
        if not self.requested:
            self.requested = reason
            self.event.set()
            log.warning("%s: finishing the round in progress, then pausing", reason)

    def wait(self, seconds: float) -> None:
        """Sleep, but wake at once when a stop is requested."""
        self.event.wait(seconds)


class Background:
    """A function on its own thread whose exception is raised again by `join`. `niceness`
    lowers that thread's CPU priority (Linux, where a nice value belongs to a thread and the
    threads it starts, such as torch's OpenMP team for work it runs, inherit it); elsewhere
    it is ignored."""

    def __init__(self, target, *, name: str, niceness: int = 0) -> None:
        self.error: BaseException | None = None
        self.niceness = niceness
        self.thread = threading.Thread(target=self._run, args=(target,), name=name, daemon=True)
        self.thread.start()

    def _run(self, target) -> None:
        try:
            if self.niceness and sys.platform == "linux":
                os.nice(self.niceness)
            target()
        except BaseException as exc:  # noqa: BLE001 - handed to the thread that joins
            self.error = exc

    def join(self) -> None:
        self.thread.join()
        if self.error is not None:
            raise self.error
