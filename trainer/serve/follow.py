"""Following a run: when `latest` names a new accepted version, load it beside the one in use
and swap. A version that cannot be loaded (pruned meanwhile, a half-published copy) is logged
and tried again at the next poll; the one in use keeps serving."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from trainer.serve.backend import Backend
from trainer.serve.versions import VersionSource

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Swap:
    version: str
    seconds: float  # from noticing the new version to serving it
    bytes_loaded: int


class Follower:
    def __init__(self, source: VersionSource, backend: Backend, *, poll_s: float,
                 on_swap: Callable[[Swap], None]) -> None:
        self.source, self.backend, self.poll_s = source, backend, poll_s
        self.on_swap = on_swap
        self.failed: str | None = None  # the version whose last attempt failed (logged once)
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="tributary-follow", daemon=True)

    def start(self) -> Follower:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.stopped.set()

    def _loop(self) -> None:
        while not self.stopped.wait(self.poll_s):
            self.check()

    def check(self) -> Swap | None:
        """One poll: swap to the newest accepted version if it is not the one served."""
        name = self.source.latest()
        if name is None or name == self.backend.version:
            return None
        started = time.perf_counter()
        try:
            prepared = self.backend.prepare(self.source.folder(name), version=name)
        except Exception as exc:  # noqa: BLE001 - keep serving what we have; retry next poll
            if self.failed != name:
                log.warning("cannot load %s yet (%s); still serving %s, retrying",
                            name, exc, self.backend.version)
            self.failed = name
            return None
        self.backend.swap(prepared)
        swap = Swap(name, time.perf_counter() - started, prepared.bytes_loaded)
        log.info("now serving %s (swap %.2f s, %d bytes loaded)", name, swap.seconds,
                 swap.bytes_loaded)
        self.on_swap(swap)
        return swap
