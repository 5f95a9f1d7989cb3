"""What `tributary submit` sends: the allow-listed part of the repository and nothing else,
the pinned requirements with --install, never credentials, and only with token auth on."""

from __future__ import annotations

import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest
import yaml

from trainer.cli import main
from trainer.submit import (
    REPO,
    UPLOAD,
    cluster_config,
    job_runtime_env,
    plain_http_problem,
    stage_upload,
    upload_files,
)


@pytest.fixture
def repo_copy(tmp_path) -> Path:
    """The allow-listed part of this repository, copied, plus what must never travel."""
    root = tmp_path / "repo"
    for name in UPLOAD:
        source = REPO / name
        if source.is_dir():
            shutil.copytree(source, root / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            root.mkdir(exist_ok=True)
            shutil.copy2(source, root / name)
    strays = {".env": "AWS_SECRET_ACCESS_KEY=x\n", "configs/.env": "TOKEN=x\n",
              "data/site/part-0.jsonl": "{}\n", "runs/a/metrics.jsonl": "{}\n",
              ".venv/bin/python": "", ".git/config": "", "notes.txt": "mine\n",
              "trainer/__pycache__/cli.cpython-311.pyc": "", "workers/.cache/x": ""}
    for relative, text in strays.items():
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        (root / relative).write_text(text)
    return root


def test_upload_is_exactly_the_allow_list(repo_copy):
    sent = {p.as_posix() for p in upload_files(repo_copy)}
    tops = {p.split("/")[0] for p in sent}
    assert tops == set(UPLOAD)
    assert not any(part.startswith(".") or part == "__pycache__"
                   for p in sent for part in p.split("/")), sent
    expected = {p.relative_to(repo_copy).as_posix() for name in UPLOAD
                for p in ([repo_copy / name] if (repo_copy / name).is_file()
                          else (repo_copy / name).rglob("*"))
                if p.is_file() and "__pycache__" not in p.parts
                and not any(part.startswith(".") for part in p.relative_to(repo_copy).parts)}
    assert sent == expected


def test_every_tracked_file_of_the_allow_list_is_sent():
    tracked = subprocess.run(["git", "ls-files", *UPLOAD], cwd=REPO, capture_output=True,
                             text=True, check=True).stdout.split()
    assert tracked and set(tracked) <= {p.as_posix() for p in upload_files(REPO)}


@pytest.mark.parametrize("relative, text, why", [
    ("configs/service-account.json",
     '{"type": "service_account", "private_key": "-----BEGIN PRIVATE KEY-----\\nMII"}',
     "holds a private key"),
    ("cluster/templates/deploy.pem", "not even a key", "named like a key file"),
    ("trainer/id_ed25519", "x", "named like a key file"),
    ("configs/prod.yaml", "sites:\n- {name: a, path: 's3://AKIAX:SECRET@bucket/a'}\n",
     "holds credentials (sites[0].path)"),
    ("configs/deepspeed/wandb.json", '{"wandb": {"api_key": "0123abcd"}}',
     "holds credentials (wandb.api_key)"),
])
def test_a_key_file_inside_the_allow_list_stops_the_upload(repo_copy, relative, text, why):
    (repo_copy / relative).write_text(text)
    with pytest.raises(ValueError, match=re.escape(f"{relative}: {why}")):
        upload_files(repo_copy)


def test_a_symbolic_link_stops_the_upload(repo_copy, tmp_path):
    (tmp_path / "elsewhere").mkdir()
    (repo_copy / "configs" / "shared").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(ValueError, match="configs/shared: a symbolic link"):
        upload_files(repo_copy)


def test_staging_copies_the_files_and_counts_them(repo_copy, tmp_path):
    staging = tmp_path / "staging"
    staging.mkdir()
    shipped = stage_upload(repo_copy, staging)
    staged = sorted(p.relative_to(staging) for p in staging.rglob("*") if p.is_file())
    assert staged == sorted(upload_files(repo_copy))
    assert all((staging / p).read_bytes() == (repo_copy / p).read_bytes() for p in staged)
    by_entry = {s.entry: s for s in shipped}
    assert set(by_entry) == {"trainer/", "workers/", "cluster/", "configs/", "pyproject.toml",
                             "setup.py", "Makefile", "README.md"}
    configs = [p for p in staged if p.parts[0] == "configs"]
    assert by_entry["configs/"].files == len(configs)
    assert by_entry["configs/"].bytes == sum((staging / p).stat().st_size for p in configs)
    assert re.fullmatch(r"\s+configs/\s+\d+ files\s+[\d,]+ bytes", by_entry["configs/"].line())


def write_config(tmp_path: Path, **changes) -> Path:
    raw = {"run": {"dir": "/shared/runs/a"}, "rounds": 1,
           "sites": [{"name": "a", "path": "/shared/data/a"}], **changes}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_install_puts_the_pinned_requirements_in_the_runtime_env(tmp_path):
    config = cluster_config(write_config(tmp_path), overrides=[])
    plain = job_runtime_env(config, working_dir=tmp_path, install=False)
    assert "pip" not in plain and plain["working_dir"] == str(tmp_path)
    pip = job_runtime_env(config, working_dir=tmp_path, install=True)["pip"]
    assert "torch==2.13.0" in pip and "pyarrow>=15" in pip and "deepspeed>=0.16" in pip
    dependencies = tomllib.loads((REPO / "pyproject.toml").read_text())["project"][
        "dependencies"]
    # All of them, but Ray: the job runs on the cluster's own.
    assert pip == [d for d in dependencies if not d.startswith("ray[")]


def test_credentials_in_a_uri_are_refused(tmp_path):
    path = write_config(tmp_path, sites=[{"name": "a", "path": "s3://AKIAX:SECRET@bucket/a"}])
    with pytest.raises(ValueError) as refused:
        cluster_config(path, overrides=[])
    message = str(refused.value)
    assert "sites[0].path hold credentials inside a URI" in message
    assert "cluster's environment or instance roles" in message
    assert "SECRET" not in message.replace("AWS_SECRET_ACCESS_KEY", "")


def test_submit_refuses_token_auth_turned_off(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    code = main(["submit", str(write_config(tmp_path)), "--address", "http://127.0.0.1:1"])
    assert code == 2
    assert "RAY_AUTH_MODE='disabled' in the environment turns Ray's token" in (
        capsys.readouterr().err)


@pytest.mark.parametrize("address", ["http://10.0.0.5:8265", "10.0.0.5:8265",
                                     "http://head.example:8265"])
def test_the_token_is_not_sent_in_plain_http_beyond_this_machine(tmp_path, capsys, address):
    code = main(["submit", str(write_config(tmp_path)), "--address", address])
    assert code == 2
    err = capsys.readouterr().err
    assert "Ray's token would travel in plain HTTP" in err and "--allow-plain-http" in err
    assert plain_http_problem("http://127.0.0.1:8265") is None
    assert plain_http_problem("https://head.example:8265") is None
