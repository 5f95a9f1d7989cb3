"""A block's peaks, sampled on a thread (benchmarks/scale.py and benchmarks/memory.py)."""

from __future__ import annotations

import threading
import time


class Periodic:
    """Calls `sample()` every `every_s` seconds on a thread while the `with` block runs
    (and once more at its end, so a block shorter than the period is sampled too)."""

    every_s = 0.001

    def sample(self) -> None:
        raise NotImplementedError

    def __enter__(self):
        self.running = True
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.running = False
        self.thread.join()
        self.sample()

    def _loop(self) -> None:
        while self.running:
            self.sample()
            time.sleep(self.every_s)
