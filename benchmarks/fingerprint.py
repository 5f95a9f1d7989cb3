"""Fingerprints of short runs: the sha256 of the final weights (and outer-optimizer state) of a
2-round run of configs/tiny.yaml in each configuration a refactor must leave unchanged —
fedavg, outer momentum, `merge.reducers: 2`, int8 deltas, LoRA, and a round the quality gate
rejects. Run it before and after a change to the round loop; every line must match.

    python benchmarks/fingerprint.py            # needs `tributary prepare-demo data/demo`
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

ARMS = {
    "fedavg": [],
    "momentum": ["merge.strategy=momentum"],
    "reducers": ["merge.reducers=2"],
    "int8": ["merge.compression=int8"],
    "lora": ["model.lora={r: 4, alpha: 8, target_modules: [q_proj, v_proj]}"],
    # 3 rounds: the third builds on v0001 after round 2's candidate is rejected.
    "gate": ["eval.shakespeare.protected=true", "quality.max_regression=0.02", "rounds=3"],
}
NOISY_ROUND = 2  # the gate arm's workers add noise in round 2: the gate rejects it


def run_arm(name: str, overrides: list[str], *, root: Path) -> dict[str, str]:
    import ray.cloudpickle

    from tests.chaos import misbehaving
    from trainer.checkpoint import all_manifests, sha256_file
    from trainer.config import load_config, resolve_paths
    from trainer.coordinator import run_training
    from workers.worker import Worker

    ray.cloudpickle.register_pickle_by_value(misbehaving)
    config = resolve_paths(load_config(REPO / "configs" / "tiny.yaml", overrides=[
        f"run.dir={root / name}", "cluster.include_dashboard=false", *overrides]))
    worker = (misbehaving.noisy_worker(round_index=NOISY_ROUND, scale=0.5) if name == "gate"
              else Worker)
    latest = run_training(config, worker_cls=worker)
    digests = {p.name: sha256_file(p) for p in sorted(latest.glob("*.safetensors"))}
    statuses = [m["status"] for m in all_manifests(root / name, include_rejected=True)]
    return {**digests, "statuses": ",".join(statuses)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arms", nargs="*", default=list(ARMS))
    args = parser.parse_args()
    os.chdir(REPO)  # the config's data paths are relative to the repository
    root = Path(tempfile.mkdtemp(prefix="fingerprint-"))
    try:
        for name in args.arms:
            print(json.dumps({"arm": name, **run_arm(name, ARMS[name], root=root)}), flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
