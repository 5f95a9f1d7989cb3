"""Ray's token, found where Ray's documentation says it lives, for HTTP calls to a cluster.

Order (Ray's own): RAY_AUTH_TOKEN, then the file named by RAY_AUTH_TOKEN_PATH, then
~/.ray/auth_token. Ray's SDK sends it only when RAY_AUTH_MODE=token is set in the caller's
environment; `tributary submit` sends it whenever one is found, so token auth stays on
without the user setting more.
"""

from __future__ import annotations

import os
from pathlib import Path


def ray_token() -> str | None:
    token = os.environ.get("RAY_AUTH_TOKEN", "").strip()
    if token:
        return token
    named = os.environ.get("RAY_AUTH_TOKEN_PATH")
    if named:
        text = Path(named).expanduser().read_text().strip()  # Ray too treats a bad path as fatal
        if not text:
            raise ValueError(f"RAY_AUTH_TOKEN_PATH={named} names an empty file")
        return text
    default = Path.home() / ".ray" / "auth_token"
    return default.read_text().strip() or None if default.is_file() else None


def auth_headers() -> dict[str, str]:
    """{"Authorization": "Bearer <token>"} if a token is found, else {}."""
    token = ray_token()
    return {"Authorization": f"Bearer {token}"} if token else {}
