"""Fault injection for the chaos tests: `TRIBUTARY_KILL_AT=POINT:ROUND` makes the coordinator
SIGKILL itself at that point of that round (points: training, merged, checkpoint — the
version written but not yet renamed into place — and renamed — in place, `latest` not moved).
Unset (always, outside tests), it does nothing."""

from __future__ import annotations

import os
import signal

ENV = "TRIBUTARY_KILL_AT"


def kill_point(point: str, round_index: int) -> None:
    if os.environ.get(ENV) == f"{point}:{round_index}":
        os.kill(os.getpid(), signal.SIGKILL)
