"""`tributary lineage RUN_DIR --file PATH | --site NAME [--rows A:B]`: the versions whose
training saw that data, and how, read from the manifests alone (they outlive pruned weights).

A version saw the data
- directly: its manifest's rows (`increments`, or `retried` for a rejected candidate whose
  rows go round again) overlap the data;
- through the replay store: it trained with replay samples after an accepted version had
  added the data's sequences (the shared store, or the site's own with `replay.scope: site`).
  A stratum keeps a share of the store for good, so the data stays drawable from then on;
- through its parent: it was built on a version that saw it (or, in `merge.mode async`, it
  merged an update trained from one).
A site's own state (optimizer, RNG, local replay) carries nothing of a rejected version: a
rejected round is never committed, and an async rejection takes the sites back with the
model (trainer/asynchronous.py), so these three ways are all there are.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from trainer.checkpoint import all_manifests
from workers.storage import is_uri, redact

HOW = ("direct", "replay", "inherited")


@dataclass(frozen=True)
class Query:
    file: str | None = None  # as the manifests name it: an absolute path or a redacted URI
    site: str | None = None
    rows: tuple[int, int] | None = None  # [A, B) of the file

    @classmethod
    def of(cls, *, file: str | None, site: str | None, rows: str | None) -> Query:
        if (file is None) == (site is None):
            raise ValueError("name the data: --file PATH or --site NAME (one of them)")
        if rows is not None and file is None:
            raise ValueError("--rows A:B needs --file (rows are a file's)")
        return cls(file=None if file is None else canonical(file), site=site,
                   rows=None if rows is None else parse_rows(rows))

    def matches(self, site: str, entry: dict) -> bool:
        if self.site is not None and site != self.site:
            return False
        if self.file is not None and canonical(entry["file"]) != self.file:
            return False
        if self.rows is None:
            return True
        start, end = self.rows
        return entry["start_row"] < end and start < entry["end_row"]


@dataclass(frozen=True)
class Touch:
    version: str
    status: str  # accepted or rejected
    how: str  # one of HOW
    rows: list[dict]  # the matching rows, for "direct": [{site, file, start_row, end_row}]


def lineage(run_dir: Path, query: Query, *, replay_scope: str = "shared") -> list[Touch]:
    """Every version (accepted and rejected) whose training saw the data, oldest first."""
    touched: dict[str, Touch] = {}
    in_store: set[str] = set()  # sites whose replay samples may hold the data ("*": all)
    for manifest in all_manifests(run_dir, include_rejected=True):
        name, status = manifest["name"], manifest["status"]
        rows = _direct_rows(manifest, query)
        if rows:
            touched[name] = Touch(name, status, "direct", rows)
        elif _replayed(manifest, in_store):
            touched[name] = Touch(name, status, "replay", [])
        elif _built_on(manifest, touched):
            touched[name] = Touch(name, status, "inherited", [])
        if rows and status == "accepted":  # an accepted round's sequences join the store
            in_store |= ({r["site"] for r in rows} if replay_scope == "site" else {"*"})
    return list(touched.values())


def saw(manifest: dict, query: Query) -> bool:
    """Whether this version trained on the data itself (not through replay or its base)."""
    return bool(_direct_rows(manifest, query))


def _direct_rows(manifest: dict, query: Query) -> list[dict]:
    found = []
    for key in ("increments", "retried"):
        for site, entries in manifest.get(key, {}).items():
            found += [{"site": site, "file": e["file"], "start_row": e["start_row"],
                       "end_row": e["end_row"]} for e in entries if query.matches(site, e)]
    return found


def _replayed(manifest: dict, in_store: set[str]) -> bool:
    replay = {site: t.get("replay", 0) for site, t in manifest.get("tokens", {}).items()}
    return any(count > 0 and ("*" in in_store or site in in_store)
               for site, count in replay.items())


def _built_on(manifest: dict, touched: dict[str, Touch]) -> bool:
    bases = {manifest.get("parent")} | {u.get("base") for u in manifest.get("lineage", [])}
    return any(base in touched for base in bases if base)


def canonical(location: str) -> str:
    """How manifests name a file: a local path absolute and resolved, a URI redacted."""
    return redact(location) if is_uri(location) else str(Path(location).resolve())


def parse_rows(text: str) -> tuple[int, int]:
    try:
        start, end = (int(part) for part in text.split(":"))
    except ValueError:
        raise ValueError(f"--rows {text!r}: expected A:B, e.g. 0:100 (rows A to B-1)") from None
    if not 0 <= start < end:
        raise ValueError(f"--rows {text!r}: expected 0 <= A < B")
    return start, end


def render(touches: list[Touch]) -> str:
    """A table: version, status, how, and the rows of a direct touch."""
    if not touches:
        return "no version saw that data"
    lines = [f"{'version':8} {'status':9} {'how':10} rows"]
    for touch in touches:
        rows = "; ".join(f"{r['site']}: {Path(r['file']).name} [{r['start_row']}, "
                         f"{r['end_row']})" for r in touch.rows)
        lines.append(f"{touch.version:8} {touch.status:9} {touch.how:10} {rows}".rstrip())
    return "\n".join(lines)


def as_json(touches: list[Touch]) -> str:
    return json.dumps([asdict(t) for t in touches], indent=2)
