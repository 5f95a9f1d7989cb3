"""Retraction is exact: retracting a file (or a site) gives the weights of a run that never had
it, bit for bit; nothing of the new line names it or holds its sequences; the replaced
versions are set aside without weights; an interrupted retraction continues to the same end."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import threading
import time

import pyarrow.parquet as pq
import pytest
import ray
import torch
from safetensors.torch import load_file

from tests.helpers import tiny_config
from trainer import retract as retract_module
from trainer.checkpoint import all_manifests, latest_version
from trainer.config import load_config
from trainer.coordinator import run_training
from trainer.retract import carry_out, plan

pytestmark = pytest.mark.integration
ROUNDS = 4  # enough for the notes site to read all of part-0, part-1 and into part-2


def weights(run_dir):
    return load_file(str(latest_version(run_dir) / "model.safetensors"))


def assert_same_weights(run_dir, reference):
    got, expected = weights(run_dir), weights(reference)
    assert got.keys() == expected.keys()
    assert all(torch.equal(got[k], expected[k]) for k in expected)


def retract(run_dir, **what):
    config = load_config(run_dir / "config.yaml", check_files=False)
    planned = plan(run_dir, config, reason="test", **what)
    assert planned.missing == []
    return carry_out(run_dir, planned.record, run=run_training), planned.record


def held_strata(run_dir) -> set[str]:
    """The strata (site/file) of which the newest replay snapshot holds sequences."""
    snapshot = run_dir / all_manifests(run_dir)[-1]["replay"]
    strata = json.loads((snapshot / "state.json").read_text())["strata"]
    return {entry["name"] for index, entry in enumerate(strata)
            if pq.read_table(snapshot / f"stratum-{index:04d}.parquet").num_rows}


@pytest.fixture(scope="module")
def runs(ray_cluster, demo_root, notes_site, tmp_path_factory):
    """The original run, and fresh runs whose notes site never had part-1."""
    root = tmp_path_factory.mktemp("retract")
    without = root / "notes-without-part-1"
    without.mkdir()
    for part in ("part-0.jsonl", "part-2.jsonl"):
        shutil.copy2(notes_site / part, without / part)
    original = root / "original" / "run"
    run_training(tiny_config(demo_root, notes_site, original, rounds=ROUNDS))
    fresh = root / "fresh" / "run"
    run_training(tiny_config(demo_root, without, fresh, rounds=ROUNDS,
                             **{"sites.notes.path": str(without)}))
    return {"root": root, "original": original, "fresh": fresh, "without": without}


def copy_of(runs, name):
    target = runs["root"] / name / "run"
    shutil.copytree(runs["original"], target, symlinks=True)
    config = runs["original"] / "config.yaml"  # the copy runs in its own folder
    (target / "config.yaml").write_text(config.read_text().replace(
        str(runs["original"]), str(target)))
    return target


def test_retracting_a_file_equals_a_run_that_never_had_it(runs, notes_site):
    run_dir = copy_of(runs, "file")
    part = str(notes_site / "part-1.jsonl")
    touched = [m["name"] for m in all_manifests(run_dir)
               if any(e["file"] == part for e in m["increments"].get("notes", []))]
    assert touched, "the run never read part-1: nothing to retract"

    latest, record = retract(run_dir, file=part, site=None)

    assert_same_weights(run_dir, runs["fresh"])
    assert latest.resolve().name == latest_version(runs["fresh"]).name
    new_line = all_manifests(run_dir, include_rejected=True)
    assert not any(e["file"] == part for m in new_line for e in m["increments"].get("notes", []))
    assert not any("part-1" in name for name in held_strata(run_dir))
    assert any("part-1" in name for name in held_strata(runs["original"]))  # it did before
    aside = run_dir / "versions" / "retracted" / record.id
    assert sorted(p.name for p in aside.iterdir()) == record.replaced
    assert all([f.name for f in (aside / v).iterdir()] == ["manifest.json"]
               for v in record.replaced)  # weights deleted, the manifests kept
    saved = json.loads((run_dir / "retractions" / f"{record.id}.json").read_text())
    assert saved["status"] == "done" and saved["file"] == part and saved["reason"] == "test"
    assert not (run_dir / "retractions" / record.id).exists()  # staging cleaned up
    # A later round never reads it again: the newest manifest keeps it skipped.
    assert "part-1.jsonl" in all_manifests(run_dir)[-1]["skipped"]["notes"]


def test_retracting_a_site_equals_a_run_without_it(runs, demo_root, notes_site):
    run_dir = copy_of(runs, "site")
    _, record = retract(run_dir, file=None, site="speeches")

    alone = runs["root"] / "alone" / "run"
    config = tiny_config(demo_root, notes_site, alone, rounds=ROUNDS)
    run_training(dataclasses.replace(config, sites=[s for s in config.sites
                                                    if s.name != "speeches"]))
    assert_same_weights(run_dir, alone)
    assert all("speeches" not in m["increments"] for m in all_manifests(run_dir)
               if m["version"] > int(record.restart_from[1:]))
    assert not any(name.startswith("speeches/") for name in held_strata(run_dir))
    assert [s.name for s in load_config(run_dir / "config.yaml", check_files=False).sites] == [
        "notes"]
    assert not (run_dir / "sites" / "speeches").exists()


def test_a_retraction_killed_midway_continues_to_the_same_end(runs, notes_site):
    run_dir = copy_of(runs, "killed")
    part = str(notes_site / "part-1.jsonl")
    env = dict(os.environ, RAY_ADDRESS=ray.get_runtime_context().gcs_address,
               TRIBUTARY_KILL_AT=f"checkpoint:{ROUNDS}")  # the last
    proc = subprocess.run([sys.executable, "-m", "trainer", "retract", str(run_dir),
                           "--file", part, "--yes"], env=env, capture_output=True, text=True,
                          timeout=600, check=False)
    assert proc.returncode == -9, proc.stderr[-3000:]
    # The old line is untouched until the new one is complete.
    assert latest_version(run_dir).name == latest_version(runs["original"]).name
    assert not (run_dir / "versions" / "retracted").exists()

    again = subprocess.run([sys.executable, "-m", "trainer", "retract", str(run_dir)],
                           env=dict(env, TRIBUTARY_KILL_AT=""), capture_output=True,
                           text=True, timeout=600, check=False)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "continuing retraction r0001" in again.stdout
    assert_same_weights(run_dir, runs["fresh"])


def test_a_running_run_pauses_retracts_and_continues(runs, demo_root, notes_site, capsys):
    run_dir = runs["root"] / "live" / "run"
    config = tiny_config(demo_root, notes_site, run_dir, rounds=ROUNDS)
    result = {}
    live = threading.Thread(target=lambda: result.update(
        latest=retract_module.train(config, resume=False, run=run_training)))
    live.start()
    while not (run_dir / "versions" / "v0002").exists() and live.is_alive():
        time.sleep(0.2)
    assert retract_module.is_running(run_dir)
    planned = plan(run_dir, load_config(run_dir / "config.yaml", check_files=False),
                   file=str(notes_site / "part-1.jsonl"), site=None, reason="while running")
    retract_module.request(run_dir, planned.record)
    live.join(timeout=900)

    assert "latest" in result, "the run raised; see the log above"
    record = json.loads((run_dir / "retractions" / f"{planned.record.id}.json").read_text())
    assert record["status"] == "done" and record["reason"] == "while running"
    assert "Paused after round" in capsys.readouterr().out  # it did pause, mid-run
    assert_same_weights(run_dir, runs["fresh"])  # paused, retracted, continued to the end
    assert not retract_module.is_running(run_dir)


def copy_run(source, target):
    """A copy of a run folder (a retraction's staging copy in it too) that works where it is."""
    shutil.copytree(source, target, symlinks=True)
    for config in [target / "config.yaml", *target.glob("retractions/r*/*/config.yaml")]:
        config.write_text(config.read_text().replace(str(source), str(target)))
    return target


def tree(run_dir) -> dict[str, str]:
    """Every path of the run folder and what it holds (a retraction record without its times)."""
    import hashlib

    found = {}
    for path in sorted(run_dir.rglob("*")):
        relative = str(path.relative_to(run_dir))
        if path.is_symlink():
            found[relative] = f"-> {os.readlink(path)}"
        elif path.is_dir():
            found[relative] = "dir"
        elif path.parent.name == "retractions" and path.suffix == ".json":
            record = json.loads(path.read_text())
            found[relative] = json.dumps({k: v for k, v in record.items()
                                          if k not in ("started", "finished")}, sort_keys=True)
        else:
            text = path.read_text() if path.name == "config.yaml" else None
            data = text.replace(str(run_dir), "RUN").encode() if text else path.read_bytes()
            found[relative] = hashlib.sha256(data).hexdigest()
    return found


def test_a_swap_killed_at_each_of_its_steps_continues_to_the_same_folders(runs, notes_site):
    """SIGKILL the retraction at every step of its swap in turn, continue it: each time the
    run folder ends exactly as after an uninterrupted retraction."""
    base = copy_of(runs, "swap-base")
    part = str(notes_site / "part-1.jsonl")
    env = dict(os.environ, RAY_ADDRESS=ray.get_runtime_context().gcs_address)

    def retract_cli(run_dir, *args, kill_at=""):
        return subprocess.run([sys.executable, "-m", "trainer", "retract", str(run_dir), *args],
                              env=dict(env, TRIBUTARY_KILL_AT=kill_at), capture_output=True,
                              text=True, timeout=600, check=False)

    built = retract_cli(base, "--file", part, "--yes", kill_at="swap:0")  # before any move
    assert built.returncode == -9, built.stderr[-3000:]
    reference = copy_run(base, runs["root"] / "swap-reference" / "run")
    assert retract_cli(reference).returncode == 0
    expected = tree(reference)
    assert_same_weights(reference, runs["fresh"])
    step = 0
    while True:
        step += 1
        run_dir = copy_run(base, runs["root"] / f"swap-{step}" / "run")
        killed = retract_cli(run_dir, kill_at=f"swap:{step}")
        if killed.returncode == 0:  # the swap has fewer steps: each one was tried
            break
        assert killed.returncode == -9, killed.stderr[-3000:]
        continued = retract_cli(run_dir)
        assert continued.returncode == 0, (step, continued.stderr[-3000:])
        assert tree(run_dir) == expected, f"killed after step {step} of the swap"
        shutil.rmtree(run_dir.parent)
    assert step > 10, "the swap's steps were not all reached"
