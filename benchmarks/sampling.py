"""Measuring helpers of benchmarks/scale.py, memory.py and zero_memory.py: a block's peaks,
sampled on a thread, the object store's bytes in use, and the workers' memory."""

from __future__ import annotations

import threading
import time

import psutil
import ray


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


def store_bytes_used() -> int | None:
    """Bytes in the cluster's object stores (Ray's internal memory API; None when Ray is not
    up, e.g. between a run's start and stop, or the private API is unavailable)."""
    if not ray.is_initialized():
        return None
    try:
        from ray._private.internal_api import get_memory_info_reply, get_state_from_address

        reply = get_memory_info_reply(get_state_from_address(
            ray.get_runtime_context().gcs_address))
        return int(reply.store_stats.object_store_bytes_used)
    except Exception:  # noqa: BLE001 - a private API: report "n/a" rather than fail
        return None


def uss(process: psutil.Process) -> int:
    """Memory only `process` holds (0 if it is gone or not ours to read)."""
    try:
        return process.memory_full_info().uss
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return 0


def worker_processes() -> list[psutil.Process]:
    """This machine's Tributary worker actors (`ray::Worker...`, one per rank)."""
    found = []
    for process in psutil.process_iter(["name", "cmdline"]):
        title = " ".join(process.info["cmdline"] or [process.info["name"] or ""])
        if title.startswith("ray::Worker"):
            found.append(process)
    return found
