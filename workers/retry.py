"""Transient storage faults: retried with bounded backoff, told apart from damaged files.

A site's data may sit on a network filesystem or an object store, where a read can fail for
reasons that have nothing to do with the file: a timeout, a reset connection, throttling, a
5xx answer, EIO, a permission that comes back. Those are retried; if they persist, the caller
gives up for now (a site sits the round out) and tries again later. Only a file whose bytes can
be read but not parsed is damaged (workers/increments.py decides that).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TypeVar

log = logging.getLogger(__name__)
T = TypeVar("T")

# Attempts of one read, and the first pause between them (doubled each time): a blip of a few
# seconds is ridden out inside the round; a longer outage makes the site sit the round out.
READ_ATTEMPTS = 3
READ_BACKOFF_S = 0.5


class StorageUnavailable(OSError):
    """Storage kept failing after the retries: not the file's fault; try again later."""


# Object-store answers that no retry will change (pyarrow raises them as plain OSError).
PERMANENT_WORDS = ("not found", "nosuchbucket", "invalid bucket name")


def is_transient(exc: BaseException) -> bool:
    """An I/O fault that may go away: any OSError except a file or bucket that is not there
    (pyarrow reports network, throttling and 5xx errors of object stores as OSError too)."""
    if not isinstance(exc, OSError) or isinstance(
            exc, FileNotFoundError | IsADirectoryError | NotADirectoryError):
        return False
    text = str(exc).lower()
    return not any(word in text for word in PERMANENT_WORDS)


def retrying(action: Callable[[], T], *, what: str, attempts: int = READ_ATTEMPTS,
             backoff_s: float = READ_BACKOFF_S) -> T:
    """`action()`, retried on transient faults; StorageUnavailable once they persist."""
    for attempt in range(1, attempts + 1):
        try:
            return action()
        except OSError as exc:
            if not is_transient(exc):
                raise
            if attempt == attempts:
                raise StorageUnavailable(
                    f"{what}: {_first_line(exc)} (still failing after {attempts} attempts; "
                    "the site sits this round out and reads it later)") from exc
            log.warning("%s: %s; retrying in %.1f s", what, _first_line(exc),
                        backoff_s * 2 ** (attempt - 1))
            time.sleep(backoff_s * 2 ** (attempt - 1))
    raise AssertionError("unreachable")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
