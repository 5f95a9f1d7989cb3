"""A version written in the background: its error comes back at `join`, and on Linux its
thread (and the threads it starts) runs at a lower CPU priority while the caller's stays."""

from __future__ import annotations

import os
import sys
import threading

import pytest

from trainer.threads import Background


def priority() -> int:
    return os.getpriority(os.PRIO_PROCESS, 0)  # 0: the calling thread, on Linux


def test_an_error_on_the_thread_is_raised_by_join():
    def fail() -> None:
        raise ValueError("disk full")

    task = Background(fail, name="fails")
    with pytest.raises(ValueError, match="disk full"):
        task.join()


@pytest.mark.skipif(sys.platform != "linux", reason="a nice value per thread is Linux's")
def test_niceness_lowers_the_thread_and_its_children_not_the_caller():
    before = priority()
    seen: dict[str, int] = {}

    def work() -> None:
        seen["thread"] = priority()
        child = threading.Thread(target=lambda: seen.__setitem__("child", priority()))
        child.start()
        child.join()

    Background(work, name="niced", niceness=5).join()
    assert seen["thread"] == min(before + 5, 19)
    assert seen["child"] == seen["thread"]
    assert priority() == before
