"""The per-round table printed during a run and by `tributary report`."""

from __future__ import annotations


class RoundTable:
    def __init__(self, *, sites: list[str], eval_sets: list[str],
                 staleness: bool = False) -> None:
        self.sites = sites
        self.eval_sets = eval_sets
        self.staleness = staleness  # merge.mode async: the largest staleness merged
        self.columns = (["round", "version", "ok/fail", "new tok", "replay tok"]
                        + ["stale"] * staleness + [f"loss {s}" for s in sites]
                        + [f"ppl {e}" for e in eval_sets] + ["merge s", "round s"])
        self.widths = [max(8, len(c)) for c in self.columns]
        self.widths[1] = 9  # room for "v0003-rej"

    def header(self) -> str:
        head = "  ".join(c.rjust(w) for c, w in zip(self.columns, self.widths))
        return f"{head}\n{'-' * len(head)}"

    def row(self, record: dict) -> str:
        losses = record.get("train_loss", {})
        ppl = record.get("eval_perplexity", {})
        version = record["version"] + ("-rej" if record.get("status") == "rejected" else "")
        cells = [str(record["round"]), version,
                 f"{record.get('workers_ok', 0)}/{record.get('workers_failed', 0)}",
                 str(sum(record.get("new_tokens", {}).values())),
                 str(sum(record.get("replay_tokens", {}).values()))]
        if self.staleness:
            stale = [t for values in record.get("staleness", {}).values() for t in values]
            cells.append(str(max(stale)) if stale else "-")
        cells += [_number(losses.get(s)) for s in self.sites]
        cells += [_number(ppl.get(e)) for e in self.eval_sets]
        cells += [_number(record.get("merge_seconds"), 2), _number(record.get("round_seconds"), 1)]
        return "  ".join(c.rjust(w) for c, w in zip(cells, self.widths))


def _number(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def render(records: list[dict]) -> str:
    """The whole table for a list of metrics.jsonl records."""
    sites = sorted({s for r in records for s in r.get("train_loss", {})})
    sets = sorted({e for r in records for e in r.get("eval_perplexity", {})})
    staleness = any(t for r in records for values in r.get("staleness", {}).values()
                    for t in values)
    table = RoundTable(sites=sites, eval_sets=sets, staleness=staleness)
    return "\n".join([table.header()] + [table.row(r) for r in records])


def markdown(headers: list[str], rows: list[list[str]]) -> str:
    """A Markdown table (readable as plain text too)."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)
