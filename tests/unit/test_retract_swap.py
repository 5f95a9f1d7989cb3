"""A retraction's swap, on run folders laid out as a run leaves them, killed (SIGKILL, in a
child process) at each of its steps and continued: the folders end exactly as after an
uninterrupted swap. The case the old swap got wrong: the old line's v0003 was rejected, the
new line accepts it, and a crash after the new line moved in used to set the new v0003 aside
(its weights deleted) on the continuation."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from tests.helpers import REPO_ROOT
from trainer.retract import Record

SWAP = """
import sys
from pathlib import Path
from trainer import retract
run = Path(sys.argv[1])
record = retract.unfinished(run)
if record is not None:  # None: the swap had ended
    retract._swap(run, record, retract.staging(run, record))
"""


def version(folder: Path, *, name: str, status: str, weights: str, files=()) -> None:
    folder.mkdir(parents=True)
    manifest = {"name": name, "version": int(name[1:]), "status": status, "round":
                int(name[1:]), "increments": {"notes": [
                    {"file": f, "start_row": 0, "end_row": 5} for f in files]}}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    (folder / "model.safetensors").write_text(weights)


def laid_out(root: Path) -> Path:
    """Old line: v0002 accepted, v0003 rejected, and a superseded v0002 of an earlier resume
    that read the withdrawn file; new line (staging): v0002 and v0003 both accepted."""
    run = root / "run"
    versions = run / "versions"
    version(versions / "v0001", name="v0001", status="accepted", weights="w1")
    version(versions / "v0002", name="v0002", status="accepted", weights="old2",
            files=["/data/withdrawn.jsonl"])
    version(versions / "rejected" / "v0003", name="v0003", status="rejected", weights="old3")
    version(versions / "superseded" / "v0002", name="v0002", status="accepted",
            weights="older2", files=["/data/withdrawn.jsonl"])
    os.symlink("v0002", versions / "latest")
    stage = run / "retractions" / "r0001" / "run"
    version(stage / "versions" / "v0002", name="v0002", status="accepted", weights="new2")
    version(stage / "versions" / "v0003", name="v0003", status="accepted", weights="new3")
    for folder in (stage / "replay" / "v0003", run / "replay" / "v0002"):
        folder.mkdir(parents=True)
        (folder / "state.json").write_text(folder.parent.parent.name)
    (stage / "metrics.jsonl").write_text('{"new": true}\n')
    (run / "metrics.jsonl").write_text('{"old": true}\n')
    Record(id="r0001", file="/data/withdrawn.jsonl", site=None, reason="test",
           restart_from="v0001", replaced=["v0002", "v0003"], rounds=3,
           status="swapping").save(run)
    return run


def swap(run: Path, *, kill_at: str = "") -> int:
    env = dict(os.environ, TRIBUTARY_KILL_AT=kill_at)
    return subprocess.run([sys.executable, "-c", SWAP, str(run)], cwd=REPO_ROOT, env=env,
                          check=False, capture_output=True).returncode


def tree(run: Path) -> dict[str, str]:
    found = {}
    for path in sorted(run.rglob("*")):
        relative = str(path.relative_to(run))
        if path.is_symlink():
            found[relative] = "-> " + os.readlink(path)
        elif path.is_file():
            data = path.read_bytes()
            if path.parent.name == "retractions":
                record = json.loads(data)
                data = json.dumps({k: v for k, v in record.items()
                                   if k not in ("started", "finished")}).encode()
            found[relative] = hashlib.sha256(data).hexdigest()
        else:
            found[relative] = "dir"
    return found


def test_an_uninterrupted_swap_sets_aside_exactly_the_old_line(tmp_path):
    run = laid_out(tmp_path)
    assert swap(run) == 0
    versions = run / "versions"
    assert (versions / "v0003" / "model.safetensors").read_text() == "new3"
    assert (versions / "v0002" / "model.safetensors").read_text() == "new2"
    assert os.readlink(versions / "latest") == "v0003"
    aside = versions / "retracted" / "r0001"
    assert sorted(str(p.relative_to(aside)) for p in aside.rglob("manifest.json")) == [
        "rejected/v0003/manifest.json", "superseded/v0002/manifest.json",
        "v0002/manifest.json"]
    assert not list(aside.rglob("*.safetensors"))  # nothing trained on it keeps weights
    assert not (versions / "superseded" / "v0002").exists()


def test_a_swap_killed_at_each_step_and_continued_ends_the_same(tmp_path):
    reference = laid_out(tmp_path / "reference")
    assert swap(reference) == 0
    expected = tree(reference)
    step = 0
    while True:
        step += 1
        run = laid_out(tmp_path / f"killed-{step}")
        code = swap(run, kill_at=f"swap:{step}")
        if code == 0:
            break  # past the last step: every one was tried
        assert code == -9
        assert swap(run) == 0
        assert tree(run) == expected, f"killed after step {step}"
        shutil.rmtree(run.parent)
    assert step > 8
