"""`tributary submit`: a run as a Ray job on a cluster, through the Ray Jobs API.

The repository travels as the job's `runtime_env.working_dir` (without the virtualenv, runs,
data and caches); the config travels resolved and validated, in an environment variable the
job's `tributary run env:TRIBUTARY_CONFIG` reads. Site and eval data may be pyarrow filesystem
URIs (s3://, gs://, hdfs://) or absolute paths on storage all nodes mount; the run directory
must be such a mounted path (the coordinator writes versions there, and each worker its
optimizer state).
Ray's token goes with every request (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or
~/.ray/auth_token, as Ray documents; cluster/auth.py).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from cluster.auth import auth_headers
from trainer.config import Config, config_from_dict, config_text
from workers.storage import is_uri

REPO = Path(__file__).resolve().parents[1]
CONFIG_ENV = "TRIBUTARY_CONFIG"
# Not shipped to the cluster: environments, outputs, data and caches (gitignore syntax).
EXCLUDES = [".venv/", "runs/", "data/", ".git/", "**/__pycache__/", ".pytest_cache/",
            ".ruff_cache/", "*.egg-info/", "*.safetensors", "*.gguf"]


@dataclass(frozen=True)
class Submitted:
    job_id: str
    address: str
    run_dir: str

    def instructions(self) -> str:
        a = self.address
        return "\n".join([
            f"submitted job {self.job_id}",
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
    raw = yaml.safe_load(path.read_text())
    config = config_from_dict(raw, overrides=overrides, source=str(path), check_files=False)
    problems = shared_path_problems(config)
    if problems:
        raise ValueError(f"{path}: a submitted run reads and writes shared storage, so these "
                         "paths must be absolute (set them with --set KEY=/shared/...):\n  - "
                         + "\n  - ".join(problems))
    return config


def shared_path_problems(config: Config) -> list[str]:
    """Relative paths would point into the job's temporary copy of the repo (which holds no
    data and vanishes when the job ends)."""
    paths = [("run.dir", config.run.dir)]
    paths += [(f"sites[{i}].path", s.path) for i, s in enumerate(config.sites)]
    paths += [(f"eval[{i}].path", e.path) for i, e in enumerate(config.eval)]
    return [f"{key}: {value!r} is relative" for key, value in paths
            if not is_uri(value) and not Path(value).is_absolute()]


def submit(config_path: str | Path, *, address: str, overrides: list[str] = (),
           client=None) -> Submitted:
    """Submit a run; returns its job id and where to watch it."""
    from ray.job_submission import JobSubmissionClient

    config = cluster_config(config_path, overrides=list(overrides))
    client = client or JobSubmissionClient(address, headers=auth_headers())
    name = Path(config.run.dir).name
    job_id = client.submit_job(
        entrypoint=f"python -m trainer run env:{CONFIG_ENV}",
        submission_id=f"tributary-{name}-{time.strftime('%Y%m%d-%H%M%S')}",
        runtime_env={"working_dir": str(REPO), "excludes": EXCLUDES,
                     "env_vars": {CONFIG_ENV: config_text(config)}},
        metadata={"tributary_run_dir": config.run.dir})
    return Submitted(job_id=job_id, address=address.rstrip("/"), run_dir=config.run.dir)


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
