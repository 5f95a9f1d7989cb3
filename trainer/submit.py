"""`tributary submit`: a run as a Ray job on a cluster, through the Ray Jobs API.

What travels: an allow-list of the repository (UPLOAD: the packages, `configs/`, and what
`pip install -e .` reads), staged into a temporary folder that becomes the job's
`runtime_env.working_dir`, so a stray `.env`, key file, data or virtualenv never leaves this
machine; `submit` prints what it sent. The config travels resolved and validated, in an
environment variable the job's `tributary run env:TRIBUTARY_CONFIG` reads; a config with
credentials inside a URI is refused (they reach a job through the cluster's environment or
instance roles, never through a job field). `--install` adds the pinned requirements of
pyproject.toml as the job's `runtime_env.pip`, for clusters that run a stock Ray image.
Site and eval data may be pyarrow filesystem URIs (s3://, gs://, hdfs://) or absolute paths on
storage all nodes mount; the run directory must be such a mounted path (the coordinator
writes versions there, and each worker its optimizer state).
Ray's token goes with every request (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or
~/.ray/auth_token, as Ray documents; cluster/auth.py), with RAY_AUTH_MODE=token set.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from cluster.auth import auth_headers, require_token_auth
from trainer.config import Config, config_text, credential_keys, load_config
from workers.storage import is_uri, redact

REPO = Path(__file__).resolve().parents[1]
CONFIG_ENV = "TRIBUTARY_CONFIG"
# Everything a job needs: the packages, the run configs, and the files `pip install -e .`
# reads. The cluster templates ship the same list (tests/unit/test_cluster_templates.py).
UPLOAD = ("trainer", "workers", "cluster", "configs", "pyproject.toml", "setup.py", "Makefile",
          "README.md")
# Inside those: never caches or build output, nor hidden files (.env, editor state).
SKIPPED_DIRS = {"__pycache__"}
SKIPPED_SUFFIXES = (".pyc", ".egg-info")
# A file that looks like a private key stops the submission instead of travelling.
KEY_SUFFIXES = (".pem", ".key", ".p12", ".pfx", ".jks", ".keystore")
KEY_NAMES = ("id_rsa", "id_dsa", "id_ecdsa", "id_ed25519")  # ssh's default private keys
# PEM and OpenSSH private keys, also inside a cloud service account's JSON.
KEY_BLOCK = re.compile(rb"-----BEGIN [A-Z ]*PRIVATE KEY-----")
# Keys of a shipped YAML/JSON file whose value is a credential.
SECRET_KEY = re.compile(r"(secret|passw(or)?d|api[_-]?key|access[_-]?key|auth[_-]?token|"
                        r"session[_-]?token|credential)", re.IGNORECASE)
# Such a value naming a file or an environment variable is where a secret is, not one.
REFERENCE = ("/", "~", ".", "$")


@dataclass(frozen=True)
class Shipped:
    """One allow-listed entry as sent: a folder (its files) or a single file."""
    entry: str
    files: int
    bytes: int

    def line(self) -> str:
        return f"  {self.entry:<16} {self.files:>4} files {self.bytes:>12,} bytes"


@dataclass(frozen=True)
class Submitted:
    job_id: str
    address: str
    run_dir: str
    shipped: tuple[Shipped, ...] = ()
    installs: tuple[str, ...] = ()

    def instructions(self) -> str:
        a = self.address
        lines = [f"submitted job {self.job_id}", "sent (runtime_env.working_dir):"]
        lines += [s.line() for s in self.shipped]
        if self.installs:
            lines.append(f"installs on the cluster (runtime_env.pip): {' '.join(self.installs)}")
        return "\n".join(lines + [
            f"dashboard: {a}/#/jobs/{self.job_id}",
            f"run dir:   {self.run_dir}",
            f"logs:      ray job logs --address {a} --follow {self.job_id}",
            f"status:    ray job status --address {a} {self.job_id}",
            f"stop:      ray job stop --address {a} {self.job_id}",
        ])


def cluster_config(config_path: str | Path, *, overrides: list[str]) -> Config:
    """The config as the cluster will run it, validated here except for the existence of
    files that live on the cluster's storage."""
    path = Path(config_path)
    config = load_config(path, overrides=overrides, check_files=False)
    problems = shared_path_problems(config)
    if problems:
        raise ValueError(f"{path}: a submitted run reads and writes shared storage, so these "
                         "paths must be absolute (set them with --set KEY=/shared/...):\n  - "
                         + "\n  - ".join(problems))
    keys = credential_keys(config)
    if keys:
        raise ValueError(
            f"{path}: {', '.join(keys)} hold credentials inside a URI; a job's config is "
            "readable by anyone who can open the cluster's dashboard, so `submit` never sends "
            "them. Use the plain URI and give credentials through the cluster's environment "
            "or instance roles (e.g. AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY in the nodes' "
            "environment, an IAM instance profile, a GCP service account, a Kubernetes "
            "secret)")
    return config


def shared_path_problems(config: Config) -> list[str]:
    """Relative paths would point into the job's temporary copy of the repo (which holds no
    data and vanishes when the job ends)."""
    paths = [("run.dir", config.run.dir)]
    paths += [(f"sites[{i}].path", s.path) for i, s in enumerate(config.sites)]
    paths += [(f"eval[{i}].path", e.path) for i, e in enumerate(config.eval)]
    return [f"{key}: {value!r} is relative" for key, value in paths
            if not is_uri(value) and not Path(value).is_absolute()]


def upload_files(repo: Path) -> list[Path]:
    """The files `submit` sends from `repo`, relative to it: the allow-listed entries without
    caches and hidden files. Refuses (ValueError) a missing entry, a symbolic link (it could
    lead anywhere) and a file that looks like a private key."""
    missing = [name for name in UPLOAD if not (repo / name).exists()]
    if missing:
        raise ValueError(f"{repo}: {', '.join(missing)} not found; run `tributary submit` "
                         "from a checkout of Tributary")
    files: list[Path] = []
    for name in UPLOAD:
        top = repo / name
        files += _tree_files(top) if top.is_dir() and not top.is_symlink() else [top]
    refused = [f"{p.relative_to(repo)}: {why}" for p in files if (why := _refusal(p))]
    if refused:
        raise ValueError("tributary submit sends only the repository's own files; move these "
                         "out of it (or out of the way) and submit again:\n  - "
                         + "\n  - ".join(refused))
    return [p.relative_to(repo) for p in files]


def _tree_files(top: Path) -> list[Path]:
    """Every file under `top` but caches and hidden names; a symbolic link to a folder is
    listed as itself (for upload_files to refuse), not entered."""
    found = []
    for folder, dirs, names in os.walk(top):
        kept = sorted(d for d in dirs if not _skipped(d))
        found += [Path(folder, d) for d in kept if Path(folder, d).is_symlink()]
        dirs[:] = [d for d in kept if not Path(folder, d).is_symlink()]
        found += [Path(folder, n) for n in sorted(names) if not _skipped(n)]
    return found


def _skipped(name: str) -> bool:
    return name.startswith(".") or name in SKIPPED_DIRS or name.endswith(SKIPPED_SUFFIXES)


def _refusal(path: Path) -> str | None:
    """Why this file must not travel, or None."""
    if path.is_symlink():
        return "a symbolic link"
    if path.name in KEY_NAMES or path.suffix in KEY_SUFFIXES:
        return "named like a key file"
    with open(path, "rb") as handle:
        head = handle.read(1 << 20)  # keys are small; a big file is read in part
    if KEY_BLOCK.search(head):
        return "holds a private key"
    if path.suffix in (".yaml", ".yml", ".json"):
        return _config_secrets(path, head)
    return None


def _config_secrets(path: Path, head: bytes) -> str | None:
    """Why a shipped YAML or JSON file holds credentials: a URI with credentials in it (as a
    submitted config is checked), or a key named like a secret holding a value."""
    import yaml

    try:
        data = yaml.safe_load(head)  # JSON is YAML too
    except yaml.YAMLError:
        return None  # not data: the job fails on it as it would here
    found = [key for key, value in _leaves(data, "")
             if isinstance(value, str) and value and (
                 redact(value) != value or (SECRET_KEY.search(key.rsplit(".", 1)[-1])
                                            and not value.startswith(REFERENCE)))]
    return f"holds credentials ({', '.join(found)})" if found else None


def _leaves(node, prefix: str) -> list[tuple[str, object]]:
    if isinstance(node, dict):
        return [kv for k, v in node.items() for kv in _leaves(v, f"{prefix}.{k}".lstrip("."))]
    if isinstance(node, list):
        return [kv for i, v in enumerate(node) for kv in _leaves(v, f"{prefix}[{i}]")]
    return [(prefix, node)]


def stage_upload(repo: Path, into: Path) -> list[Shipped]:
    """Copy the allow-list from `repo` into the empty folder `into`; one Shipped per entry."""
    counts = {name: [0, 0] for name in UPLOAD}
    for relative in upload_files(repo):
        target = into / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(repo / relative, target)
        count = counts[relative.parts[0]]
        count[0] += 1
        count[1] += target.stat().st_size
    return [Shipped(entry=name + ("/" if (repo / name).is_dir() else ""), files=files,
                    bytes=size) for name, (files, size) in counts.items()]


def pinned_requirements(pyproject: Path) -> list[str]:
    """[project].dependencies of pyproject.toml, without Ray itself: the job runs on the
    cluster's Ray, and a second one installed into the job's environment would have to match
    it exactly."""
    import tomllib

    with open(pyproject, "rb") as handle:
        dependencies = tomllib.load(handle)["project"]["dependencies"]
    return [d for d in dependencies
            if re.match(r"[A-Za-z0-9._-]+", d).group(0).lower() != "ray"]


def job_runtime_env(config: Config, *, working_dir: Path, install: bool,
                    repo: Path = REPO) -> dict:
    env = {"working_dir": str(working_dir), "env_vars": {CONFIG_ENV: config_text(config)}}
    if install:
        env["pip"] = pinned_requirements(repo / "pyproject.toml")
    return env


def plain_http_problem(address: str) -> str | None:
    """Why sending Ray's token to `address` would expose it: plain HTTP beyond this machine."""
    from urllib.parse import urlsplit

    from cluster.connect import is_loopback

    parts = urlsplit(address if "://" in address else f"http://{address}")
    if parts.scheme not in ("http", "ray") or is_loopback(parts.hostname or ""):
        return None
    return (f"--address {address}: Ray's token would travel in plain HTTP to "
            f"{parts.hostname}, where anyone on the way can read it and run code on the "
            "cluster. Use https:// (TLS in front of the dashboard) or a tunnel (`ray dashboard "
            "CLUSTER.yaml`, then --address http://127.0.0.1:8265); on a network that is yours "
            "alone, pass --allow-plain-http")


def submit(config_path: str | Path, *, address: str, overrides: list[str] = (),
           install: bool = False, client=None, repo: Path = REPO,
           allow_plain_http: bool = False) -> Submitted:
    """Submit a run; returns its job id, what was sent and where to watch it."""
    from ray.job_submission import JobSubmissionClient

    require_token_auth(who="tributary submit")
    problem = None if allow_plain_http else plain_http_problem(address)
    if problem:
        raise ValueError(problem)
    config = cluster_config(config_path, overrides=list(overrides))
    client = client or JobSubmissionClient(address, headers=auth_headers())
    name = Path(config.run.dir).name
    # The client zips and uploads working_dir inside submit_job, so the staging folder only
    # has to outlive that call.
    with tempfile.TemporaryDirectory(prefix="tributary-submit-") as staging:
        shipped = stage_upload(repo, Path(staging))
        runtime_env = job_runtime_env(config, working_dir=Path(staging), install=install,
                                      repo=repo)
        job_id = client.submit_job(
            entrypoint=f"python -m trainer run env:{CONFIG_ENV}",
            submission_id=f"tributary-{name}-{time.strftime('%Y%m%d-%H%M%S')}",
            runtime_env=runtime_env, metadata={"tributary_run_dir": config.run.dir})
    return Submitted(job_id=job_id, address=address.rstrip("/"), run_dir=config.run.dir,
                     shipped=tuple(shipped), installs=tuple(runtime_env.get("pip", ())))


def wait(submitted: Submitted, *, client=None, poll_s: float = 2.0,
         timeout_s: float | None = None) -> str:
    """Follow the job until it ends; returns its final status (SUCCEEDED, FAILED, STOPPED)."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    client = client or JobSubmissionClient(submitted.address, headers=auth_headers())
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while True:
        status = client.get_job_status(submitted.job_id)
        if status in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
            return str(status.value)
        if deadline is not None and time.monotonic() > deadline:
            raise TimeoutError(f"job {submitted.job_id} still {status.value} after {timeout_s} s")
        time.sleep(poll_s)
