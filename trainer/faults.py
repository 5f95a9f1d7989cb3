"""Fault injection for the chaos tests: `TRIBUTARY_KILL_AT=POINT:ROUND` makes the coordinator
SIGKILL itself at that point of that round (points: training, merged, checkpoint — the
version written but not yet renamed into place — and renamed — in place, `latest` not moved;
asynchronous merging also has launched — its free sites just given tasks).
`TRIBUTARY_PAUSE_AT=POINT:ROUND:SECONDS` makes it sleep there instead (a long merge or
evaluation, as a test needs it). Unset (always, outside tests), they do nothing."""

from __future__ import annotations

import os
import signal
import time

ENV = "TRIBUTARY_KILL_AT"
PAUSE_ENV = "TRIBUTARY_PAUSE_AT"


def kill_point(point: str, round_index: int) -> None:
    if os.environ.get(ENV) == f"{point}:{round_index}":
        os.kill(os.getpid(), signal.SIGKILL)
    where, _, seconds = os.environ.get(PAUSE_ENV, "").rpartition(":")
    if where == f"{point}:{round_index}":
        time.sleep(float(seconds))
