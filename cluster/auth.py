"""Ray's token authentication: kept on, and the token found where Ray documents it.

Mode: Ray's switch is the RAY_AUTH_MODE environment variable (`token` or `disabled`; any other
value means disabled). Tributary sets it to `token` for the embedded cluster it starts and for
the `submit` client, and refuses a run whose environment turns it off.
Token: RAY_AUTH_TOKEN, then the file named by RAY_AUTH_TOKEN_PATH, then ~/.ray/auth_token
(Ray's own order). Ray's SDK sends it only when RAY_AUTH_MODE=token is set in the caller's
environment; `tributary submit` also sends it explicitly whenever one is found.
"""

from __future__ import annotations

import os
from pathlib import Path

AUTH_MODE_ENV = "RAY_AUTH_MODE"
MIN_RAY = (2, 52)  # the first Ray release with token authentication


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


def require_token_auth(*, who: str) -> None:
    """Turn Ray's token authentication on for this process and the processes it starts, or
    refuse (RuntimeError) where the installed Ray has none or the environment turns it off.

    Without it, anyone who reaches one of Ray's ports can run code on the machine."""
    import ray

    if ray_version(ray.__version__) < MIN_RAY:
        raise RuntimeError(
            f"{who}: Ray {ray.__version__} has no token authentication (it came in Ray "
            f"{'.'.join(map(str, MIN_RAY))}); install a newer Ray: pip install -e . "
            "(pyproject.toml pins the minimum)")
    mode = os.environ.get(AUTH_MODE_ENV)
    if mode is not None and mode != "token":
        raise RuntimeError(
            f"{who}: {AUTH_MODE_ENV}={mode!r} in the environment turns Ray's token "
            "authentication off, and Tributary keeps it on (without it anyone who reaches a "
            f"Ray port can run code on the machine); unset {AUTH_MODE_ENV} or set it to "
            "'token'")
    os.environ[AUTH_MODE_ENV] = "token"
    if not ray.is_initialized():  # a connected process keeps the config its cluster gave it
        _refresh_ray_auth_mode()


def _refresh_ray_auth_mode() -> None:
    """Ray caches its config per process on first use, so a process that touched Ray before
    the variable was set would still run without auth (and start a cluster whose processes
    disagree with it). Ray's own `_enable_token_auth` refreshes the cache the same way."""
    from ray._raylet import AuthenticationMode, Config, get_authentication_mode

    if get_authentication_mode() != AuthenticationMode.TOKEN:
        Config.initialize("")
    if get_authentication_mode() != AuthenticationMode.TOKEN:
        raise RuntimeError(f"{AUTH_MODE_ENV}=token is set but Ray still reports token "
                           "authentication off; start a fresh Python process")


def ray_version(text: str) -> tuple[int, int]:
    """(major, minor) of a Ray version string such as '2.60.0' or '3.0.0.dev0'."""
    major, minor = text.split(".")[:2]
    return int(major), int(minor)
