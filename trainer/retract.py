"""`tributary retract RUN_DIR --file PATH | --site NAME`: the run as if that data had never
arrived, made exactly.

The lineage (trainer/lineage.py) names the first version the data touched. Everything a run
holds just before it — the global weights and outer state, cursors and control, every
site's optimizer and RNG states, the replay store — predates the data, so the run restarts
from there in a staging copy (`RUN_DIR/retractions/rNNNN/RUN_NAME`: versions up to that
point, hard-linked), with the file never read (or the site gone), for as many rounds as the
run had made. Only when that new line is complete does it replace the old: the replaced
versions move to `versions/retracted/rNNNN/` (weights deleted unless asked to keep them;
manifests kept for the audit), the new ones, replay snapshots, worker states, metrics and
config take their place, and `latest` moves last. The record `retractions/rNNNN.json` says
what was removed, why, when, from where, and which versions were replaced; a retraction that
was interrupted is continued by running `tributary retract RUN_DIR` again.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import os
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self

from trainer import checkpoint
from trainer.config import Config, dump_config, load_config
from trainer.faults import kill_point
from trainer.lineage import Query, lineage, saw
from trainer.runlock import RunLock, holder
from workers.storage import is_uri

log = logging.getLogger(__name__)
RETRACTIONS = "retractions"
RETRACTED = "retracted"  # versions/retracted/rNNNN/: the replaced versions' manifests


@dataclass
class Record:
    """retractions/rNNNN.json: what was removed and what it replaced."""
    id: str
    file: str | None
    site: str | None
    reason: str
    restart_from: str  # the last version before the data: the new line builds on it
    replaced: list[str]  # versions the data touched or that came after them
    rounds: int  # the rounds the run had made, made again
    # requested (a running run pauses for it) → running → swapping → done
    status: str = "running"
    started: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    finished: str | None = None
    new_line: list[str] = field(default_factory=list)
    keep_weights: bool = False
    # The old line's folders under versions/ ("v0003", "rejected/v0004", "superseded/v0002"),
    # recorded before the swap's first move: only these are ever set aside.
    old_line: list[str] | None = None

    def save(self, run_dir: Path) -> None:
        (run_dir / RETRACTIONS).mkdir(exist_ok=True)
        checkpoint.write_json(run_dir / RETRACTIONS / f"{self.id}.json", dataclasses.asdict(self))


@dataclass(frozen=True)
class Plan:
    record: Record
    tokens: int  # new and replay tokens the replaced versions trained: the cost, again
    missing: list[str]  # what the restart needs and the run no longer holds


def plan(run_dir: Path, config: Config, *, file: str | None, site: str | None,
         reason: str, keep_weights: bool = False) -> Plan:
    """What a retraction would do, and whether it can (no change to anything)."""
    if file is None and site is not None and site not in {s.name for s in config.sites}:
        raise ValueError(f"{run_dir}: no site {site!r} in this run "
                         f"({', '.join(s.name for s in config.sites)})")
    query = Query.of(file=file, site=site, rows=None)
    touches = lineage(run_dir, query, replay_scope=config.replay.scope)
    if not touches:
        raise ValueError(f"{run_dir}: no version saw that data; there is nothing to retract "
                         "(`tributary lineage` lists what each version read)")
    manifests = {m["version"]: m for m in checkpoint.all_manifests(run_dir,
                                                                   include_rejected=True)}
    first = min(int(t.version[1:]) for t in touches)
    before = _restart_point(manifests, first=first)
    replaced = [m["name"] for n, m in sorted(manifests.items()) if n > before["version"]]
    tokens = sum(t.get("new", 0) + t.get("replay", 0) for n, m in manifests.items()
                 if n > before["version"] for t in m.get("tokens", {}).values())
    record = Record(id=_next_id(run_dir), file=query.file, site=site, reason=reason,
                    restart_from=before["name"], replaced=replaced,
                    rounds=max(m["round"] for m in manifests.values()),
                    keep_weights=keep_weights)
    return Plan(record, tokens, _missing(run_dir, config, manifests, before))


def _restart_point(manifests: dict[int, dict], *, first: int) -> dict:
    """The newest version before `first` (the data's first touch) that was written whole: in
    merge.mode async with run.eval_every > 1 most versions are a manifest only, and the run
    cannot restart from a model it never wrote. Version 0 always was."""
    return next(manifests[n] for n in range(first - 1, -1, -1)
                if n in manifests and manifests[n].get("weights_sha256"))


def _missing(run_dir: Path, config: Config, manifests: dict[int, dict],
             before: dict) -> list[str]:
    """Why the run cannot restart from `before`: what it reads there that is gone (pruned
    by run.keep_versions, or deleted), each with its reason."""
    accepted = [m for n, m in manifests.items() if n <= before["version"]
                and m["status"] == "accepted" and m.get("weights_sha256")]
    base = max(accepted, key=lambda m: m["version"])
    missing = []
    if not any((run_dir / checkpoint.VERSIONS / base["name"]).glob("*.safetensors")):
        missing.append(f"the weights of {base['name']} are pruned (run.keep_versions)")
    if not before.get("replay") or not (run_dir / before["replay"]).is_dir():
        missing.append(f"the replay snapshot of {before['name']} is pruned "
                       "(run.keep_versions)")
    for site in config.sites:
        committed = _committed(config, site.name, manifests, before)
        if committed and not _states(run_dir, site.name, committed):
            kind = "task" if config.merge.mode == "async" else "round"
            missing.append(f"site {site.name}'s state of {kind} {committed} is gone "
                           f"(sites/{site.name}/state*/round-{committed:04d})")
    return missing


def _committed(config: Config, site: str, manifests: dict[int, dict], before: dict) -> int:
    """The state a site restores at `before`: in merge.mode async its own count of tasks
    merged (`sequence`), else the last round it was accepted in."""
    if config.merge.mode == "async":
        return before.get("sequence", {}).get(site, 0)
    return max((m["round"] for n, m in manifests.items() if n <= before["version"]
                and m["status"] == "accepted" and site in m.get("increments", {})),
               default=0)


def _states(run_dir: Path, site: str, index: int) -> list[Path]:
    return list((run_dir / "sites" / site).glob(f"state*/round-{index:04d}"))


def _next_id(run_dir: Path) -> str:
    done = sorted((run_dir / RETRACTIONS).glob("r[0-9]*.json"))
    return f"r{len(done) + 1:04d}"


def unfinished(run_dir: Path) -> Record | None:
    for path in sorted((run_dir / RETRACTIONS).glob("r[0-9]*.json")):
        record = Record(**json.loads(path.read_text()))
        if record.status != "done":
            return record
    return None


def staging(run_dir: Path, record: Record) -> Path:
    return run_dir / RETRACTIONS / record.id / run_dir.name


def carry_out(run_dir: Path, record: Record, *, run) -> Path:
    """Build (or continue) the new line in staging, then swap it in, as the run's only
    writer. `run(config, resume, exclude)` trains: run_training, passed in so tests and the
    CLI share this path."""
    with RunLock(run_dir, role="retract"):
        return _carry_out(run_dir, record, run=run)


def _carry_out(run_dir: Path, record: Record, *, run) -> Path:
    if record.status == "requested":  # the run went on until it paused: count all of it
        last = checkpoint.version_number(Path(record.restart_from))
        manifests = checkpoint.all_manifests(run_dir, include_rejected=True)
        record.replaced = [m["name"] for m in manifests if m["version"] > last]
        record.rounds = max(m["round"] for m in manifests)
        record.status = "running"
    record.save(run_dir)
    stage = staging(run_dir, record)
    config = _staging_config(run_dir, record, stage)
    if record.status == "running":
        if not (stage / checkpoint.VERSIONS / checkpoint.LATEST).exists():
            _build(run_dir, record, stage, asynchronous=config.merge.mode == "async")
        exclude = ({_site_of(run_dir, record): {Path(record.file).name}} if record.file
                   else None)
        run(config, resume=True, exclude=exclude)
        record.status = "swapping"
        record.save(run_dir)
    _swap(run_dir, record, stage)
    return run_dir / checkpoint.VERSIONS / checkpoint.LATEST


def _staging_config(run_dir: Path, record: Record, stage: Path) -> Config:
    """The run's config, in staging, for the rounds it had made, a retracted site gone, and
    no site watched: where the data without the withdrawn file runs out before those rounds,
    the new line ends there instead of waiting for more (the run itself goes on watching)."""
    config = _without_site(load_config(run_dir / "config.yaml", check_files=False), record)
    sites = [dataclasses.replace(s, watch=False) for s in config.sites]
    return dataclasses.replace(config, rounds=record.rounds, sites=sites,
                               run=dataclasses.replace(config.run, dir=str(stage)))


def _without_site(config: Config, record: Record) -> Config:
    if record.file:
        return config
    return dataclasses.replace(config, sites=[s for s in config.sites if s.name != record.site])


def _site_of(run_dir: Path, record: Record) -> str:
    for touch in lineage(run_dir, Query(file=record.file)):
        for rows in touch.rows:
            return rows["site"]
    raise ValueError(f"{record.file}: no version names it any more")


def _build(run_dir: Path, record: Record, stage: Path, *, asynchronous: bool) -> None:
    """The run as it stood after `restart_from`: hard links of what it reads (nothing in
    them is ever rewritten in place), copies of what a run appends to. A site's states are
    numbered by round, or in merge.mode async by its own tasks (`sequence`)."""
    shutil.rmtree(stage, ignore_errors=True)
    last = checkpoint.version_number(Path(record.restart_from))
    manifest = _manifest(run_dir, record.restart_from)
    for parts in ([checkpoint.VERSIONS], [checkpoint.VERSIONS, checkpoint.REJECTED]):
        for folder in run_dir.joinpath(*parts).glob("v[0-9]*"):
            if not folder.is_symlink() and checkpoint.version_number(folder) <= last:
                _link_tree(folder, stage.joinpath(*parts, folder.name))
    _link_tree(run_dir / manifest["replay"], stage / manifest["replay"])
    for state in (run_dir / "sites").glob("*/state*/round-*"):
        site = state.parent.parent.name
        upto = manifest["sequence"].get(site, 0) if asynchronous else manifest["round"]
        if int(state.name.split("-")[1]) <= upto:
            _link_tree(state, stage / state.relative_to(run_dir))
    shutil.copy2(run_dir / "metrics.jsonl", stage / "metrics.jsonl")  # appended to: a copy
    if (run_dir / "quarantine").is_dir():
        shutil.copytree(run_dir / "quarantine", stage / "quarantine")
    # `latest` last: its presence says the staging copy is whole.
    accepted = max((m for m in checkpoint.all_manifests(stage) if m.get("weights_sha256")),
                   key=lambda m: m["version"])
    os.symlink(accepted["name"], stage / checkpoint.VERSIONS / checkpoint.LATEST)


def _swap(run_dir: Path, record: Record, stage: Path) -> None:
    """Replace the old line by the new one. Every step can be done again after a crash, and
    a swap continued after a crash at any step ends as an uninterrupted one."""
    steps = itertools.count(1)
    kill_point("swap", 0)
    last = checkpoint.version_number(Path(record.restart_from))
    versions, aside = run_dir / checkpoint.VERSIONS, run_dir / checkpoint.VERSIONS / RETRACTED
    aside = aside / record.id
    if record.old_line is None:  # before anything moves: what the old line is
        record.old_line = _old_line(run_dir, record, last)
        record.save(run_dir)
        kill_point("swap", next(steps))
    for relative in record.old_line:
        # Set aside before the new line moves in; a name already aside means what is here now
        # (if anything) is the new line's.
        if not (aside / relative).exists() and (versions / relative).is_dir():
            (aside / relative).parent.mkdir(parents=True, exist_ok=True)
            os.replace(versions / relative, aside / relative)
            kill_point("swap", next(steps))
    if not record.keep_weights:  # on every pass: a crash after a move left them there
        for relative in record.old_line:
            if (aside / relative).is_dir() and checkpoint.drop_weights(aside / relative):
                kill_point("swap", next(steps))
    for parts in ([checkpoint.VERSIONS], [checkpoint.VERSIONS, checkpoint.REJECTED]):
        for folder in _after(stage.joinpath(*parts), last):
            os.makedirs(run_dir.joinpath(*parts), exist_ok=True)
            os.replace(folder, run_dir.joinpath(*parts, folder.name))
            kill_point("swap", next(steps))
    for name in ("replay", "sites"):
        if (stage / name).exists():
            shutil.rmtree(run_dir / name, ignore_errors=True)
            os.replace(stage / name, run_dir / name)
            kill_point("swap", next(steps))
    if (stage / "metrics.jsonl").exists():
        os.replace(stage / "metrics.jsonl", run_dir / "metrics.jsonl")
        kill_point("swap", next(steps))
    if (stage / "config.yaml").exists():  # the run's own config, a retracted site gone
        config = load_config(run_dir / "config.yaml", check_files=False)
        dump_config(_without_site(config, record), run_dir / "config.yaml")
        (stage / "config.yaml").unlink()
        kill_point("swap", next(steps))
    newest = max(checkpoint.all_manifests(run_dir), key=lambda m: m["version"])
    checkpoint.point_latest(run_dir, newest["name"])
    kill_point("swap", next(steps))
    record.new_line = [m["name"] for m in checkpoint.all_manifests(run_dir, include_rejected=True)
                       if m["version"] > last]
    shutil.rmtree(run_dir / RETRACTIONS / record.id, ignore_errors=True)  # staging, emptied
    kill_point("swap", next(steps))
    record.status, record.finished = "done", time.strftime("%Y-%m-%dT%H:%M:%S%z")
    record.save(run_dir)


def _old_line(run_dir: Path, record: Record, last: int) -> list[str]:
    """The folders the new line replaces: every version after the restart point (accepted or
    rejected), and every superseded one that came after it or read the data itself."""
    versions = run_dir / checkpoint.VERSIONS
    query = Query.of(file=record.file, site=None if record.file else record.site, rows=None)
    old = [p.name for p in _after(versions, last)]
    old += [f"{checkpoint.REJECTED}/{p.name}" for p in _after(versions / checkpoint.REJECTED,
                                                             last)]
    for folder in sorted((versions / checkpoint.SUPERSEDED).glob("v[0-9]*")):
        if (checkpoint.version_number(folder) > last
                or saw(checkpoint.read_manifest(folder), query)):
            old.append(f"{checkpoint.SUPERSEDED}/{folder.name}")
    return old


def _after(folder: Path, last: int) -> list[Path]:
    return sorted((p for p in folder.glob("v[0-9]*") if p.is_dir() and not p.is_symlink()
                   and checkpoint.version_number(p) > last), key=checkpoint.version_number)


def _link_tree(source: Path, target: Path) -> None:
    shutil.copytree(source, target, copy_function=os.link, symlinks=True)


def _manifest(run_dir: Path, name: str) -> dict:
    for parts in ([checkpoint.VERSIONS], [checkpoint.VERSIONS, checkpoint.REJECTED]):
        path = run_dir.joinpath(*parts, name)
        if (path / "manifest.json").is_file():
            return checkpoint.read_manifest(path)
    raise FileNotFoundError(f"{run_dir}: no manifest of {name}")


def estimate(plan: Plan) -> str:
    record = plan.record
    what = f"file {record.file}" if record.file else f"site {record.site}"
    return (f"retracting {what}: the run restarts after {record.restart_from} and makes "
            f"{len(record.replaced)} version(s) again ({', '.join(record.replaced)}), up to "
            f"round {record.rounds}: about {plan.tokens:,} tokens of training")


# ---------------------------------------------------------------- a run that is going


class Pausing:
    """While a coordinator runs (it holds the run's lock, trainer/runlock.py), a retraction
    requested meanwhile (`request`) makes the run stop after the round in progress; `train`
    then retracts and continues."""

    def __init__(self, run_dir: Path, stop, *, poll_s: float = 1.0) -> None:
        self.run_dir, self.stop, self.poll_s = run_dir, stop, poll_s
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._watch, name="retractions", daemon=True)

    def __enter__(self) -> Self:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.done.set()
        self.thread.join()

    def _watch(self) -> None:
        while not self.done.wait(self.poll_s):
            record = unfinished(self.run_dir)
            if record is not None and record.status == "requested":
                self.stop.ask(f"retraction {record.id}")
                return


def is_running(run_dir: Path) -> bool:
    """Is a run or resume training this run now (it holds the run's lock and is alive)?"""
    current = holder(run_dir)
    return current is not None and current.role in ("run", "resume") and current.alive()


def request(run_dir: Path, record: Record) -> None:
    """Ask the run that is going to pause at its next round boundary and retract."""
    record.status = "requested"
    record.save(run_dir)


def wait_done(run_dir: Path, record_id: str, *, poll_s: float = 2.0) -> Record:
    """Until the running run has carried the retraction out; RuntimeError if the run ends
    (or dies) first."""
    path = run_dir / RETRACTIONS / f"{record_id}.json"
    while True:
        running = is_running(run_dir)  # looked at before the record: no race with its end
        record = Record(**json.loads(path.read_text()))
        if record.status == "done":
            return record
        if not running:
            raise RuntimeError(
                f"the run writing {run_dir} ended before it carried out retraction "
                f"{record_id} (status {record.status}); run `tributary retract {run_dir}` to "
                "carry it out now")
        time.sleep(poll_s)


def train(config: Config, *, resume: bool, run) -> Path:
    """`run(config, resume=…)` (run_training), and whenever it paused for a requested
    retraction: carry the retraction out, then go on with the run where it was going."""
    if is_uri(config.run.dir):  # retraction works on local run folders only
        return run(config, resume=resume)
    run_dir = Path(config.run.dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    with RunLock(run_dir, role="resume" if resume else "run"):  # held between the parts too
        latest = run(config, resume=resume)
        while (record := unfinished(run_dir)) is not None:
            log.info("retraction %s: restarting from %s without %s", record.id,
                     record.restart_from, record.file or f"site {record.site}")
            carry_out(run_dir, record, run=run)
            latest = run(_without_site(config, record), resume=True)
    return latest

