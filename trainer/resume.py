"""Where a resumed run continues: the run state, the accepted versions' evaluations and the
folders a resume loads, read from the newest complete manifest."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from trainer import checkpoint
from trainer.control import Control
from trainer.evaluate import EvalResult
from trainer.state import RunError, RunState
from workers.types import Cursor, SiteConfig


@dataclass(frozen=True)
class ResumePoint:
    state: RunState
    history: list[dict[str, EvalResult]]  # eval results of the accepted versions, oldest first
    version_dir: Path  # the weights to load: `versions/latest`
    replay_dir: Path  # the replay snapshot saved with the newest manifest


def resume_point(run_dir: Path, *, sites: list[SiteConfig]) -> ResumePoint:
    """Weights from `versions/latest`; cursors, replay and round from the newest complete
    manifest (a version the quality gate rejected still consumed its rows). An accepted
    version past `latest` was renamed into place just before a crash: it is done again."""
    latest = checkpoint.latest_version(run_dir)
    if latest is None:
        raise RunError(f"{run_dir} has no versions/latest; start it with `tributary run`")
    manifests = _usable(run_dir)
    newest = resume_manifest(run_dir)
    accepted = checkpoint.read_manifest(latest)["version"]
    state = RunState(
        round=newest["round"], version=newest["version"], accepted=accepted,
        cursors={s.name: Cursor.from_dict(newest["cursors"].get(s.name, {})) for s in sites},
        exhausted=set(newest.get("exhausted", [])),
        skipped={site: set(names) for site, names in newest.get("skipped", {}).items()},
        # A resume gives the gate a fresh count of rejections in a row.
        control=dataclasses.replace(Control.from_dict(newest.get("control", {})), rejections=0),
        sequence=dict(newest.get("sequence", {})))
    history = [{k: EvalResult.from_dict(v) for k, v in m["eval"].items()} for m in manifests
               if m.get("status") != "rejected"]
    return ResumePoint(state=state, history=history, version_dir=latest,
                       replay_dir=run_dir / newest["replay"])


def resume_manifest(run_dir: Path) -> dict:
    """The manifest a resume continues from: the newest one that is rejected or not past
    `latest` (an accepted version renamed into place just before a crash is done again)."""
    return max(_usable(run_dir), key=lambda m: m["version"])


def _usable(run_dir: Path) -> list[dict]:
    latest = checkpoint.latest_version(run_dir)
    accepted = checkpoint.read_manifest(latest)["version"]
    return [m for m in checkpoint.all_manifests(run_dir, include_rejected=True)
            if m.get("status") == "rejected" or m["version"] <= accepted]
