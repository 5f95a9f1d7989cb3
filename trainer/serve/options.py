"""What a server is asked to do (shipped to every replica); importing it loads nothing heavy."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

API_KEY_ENV = "TRIBUTARY_API_KEY"


@dataclass(frozen=True)
class ServeOptions:
    run_dir: str
    version: str | None = None  # pinned (rollback); None: follow `latest`
    replicas: int = 1
    host: str = "127.0.0.1"
    port: int = 8000
    api_key_sha256: str | None = None  # replicas get the key's hash, never the key
    num_cpus: float = 1.0  # per replica (also its torch threads, at least 1)
    num_gpus: float = 0.0  # per replica; > 0 generates on CUDA in bf16
    max_tokens: int = 512  # new tokens per request, at most
    poll_s: float = 1.0  # how often a replica looks for a new version


def key_digest(key: str | None) -> str | None:
    return hashlib.sha256(key.encode()).hexdigest() if key else None
