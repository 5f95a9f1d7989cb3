"""A Ray actor method made to look like a plain function, so plain classes stay Ray-free."""

from __future__ import annotations

from typing import Any

import ray


class RemoteMethod:
    """Calls `handle.<method>.remote(...)` and waits for the result."""

    def __init__(self, handle: Any, method: str) -> None:
        self.handle = handle
        self.method = method

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return ray.get(getattr(self.handle, self.method).remote(*args, **kwargs))
