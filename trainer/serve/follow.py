"""Following a run: when `latest` names a new accepted version, or the version it names holds
other weights than the one served (a retraction makes the same names again), load it beside
the one in use and swap. A version that cannot be loaded (pruned meanwhile, a half-published
copy) is logged and tried again at the next poll; the one in use keeps serving. An error
looking at the run (a network blip on a bucket) is logged and the next poll looks again:
`unable_s` says for how long the replica has not been able to look."""

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
        # (name, weight digests) of what is served; None digests: not known, looked up again.
        self.served = (backend.version, self._identity(backend.version))
        self.looked = time.monotonic()  # when a look at the run last worked
        self.blind = False  # whether the looks since have failed
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="tributary-follow", daemon=True)

    def start(self) -> Follower:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.stopped.set()

    @property
    def unable_s(self) -> float:
        """Seconds the replica has not been able to look at the run (0: it can)."""
        return time.monotonic() - self.looked if self.blind else 0.0

    def _loop(self) -> None:
        while not self.stopped.wait(self.poll_s):
            started = time.monotonic()
            try:
                self.check()
            except Exception as exc:  # noqa: BLE001 - the thread must outlive storage errors
                if not self.blind:
                    log.warning("cannot look at %s (%s); still serving %s, looking again "
                                "every %.1f s", self.source.shown, exc, self.backend.version,
                                self.poll_s)
                self.blind = True
                continue
            if self.blind:
                log.warning("looking at %s again after %.1f s", self.source.shown,
                            self.unable_s)
            self.looked, self.blind = started, False

    def _identity(self, name: str | None) -> str | None:
        try:
            return self.source.identity(name) if name else None
        except OSError:
            return None  # looked up again at the next poll

    def check(self) -> Swap | None:
        """One poll: swap to the newest accepted version if it is not the one served (by
        name, or by weights under the same name)."""
        name = self.source.latest()
        if name is None:
            return None
        identity = self.source.identity(name)
        if (name, identity) == self.served or (name == self.served[0] and identity is None):
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
        previous = self.served[0]
        self.backend.swap(prepared)
        self.served = (name, identity)
        self.source.keep_cached({name, previous} - {None})
        swap = Swap(name, time.perf_counter() - started, prepared.bytes_loaded)
        log.info("now serving %s (swap %.2f s, %d bytes loaded)", name, swap.seconds,
                 swap.bytes_loaded)
        self.on_swap(swap)
        return swap
