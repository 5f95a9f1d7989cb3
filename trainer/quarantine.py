"""The run's record of damaged input files: `RUN_DIR/quarantine/<site>.jsonl`, one line per
file (where, size, modification time, sha256, why), and the names each site skips from then
on (run state, saved in every manifest). The files themselves stay where they are."""

from __future__ import annotations

from pathlib import Path

from trainer.checkpoint import append_lines
from trainer.state import RunState


def note_damaged(run_dir: Path, state: RunState, site: str, entries: tuple[dict, ...]
                 ) -> list[dict]:
    """Record the damaged files a site met; returns the ones not recorded before."""
    known = state.skipped.setdefault(site, set())
    fresh = [e for e in entries if e["name"] not in known]
    if fresh:
        folder = run_dir / "quarantine"
        folder.mkdir(parents=True, exist_ok=True)
        append_lines(folder / f"{site}.jsonl", fresh)
    known.update(e["name"] for e in fresh)
    return fresh
