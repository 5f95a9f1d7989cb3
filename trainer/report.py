"""`tributary report RUN_DIR`: PNG plots and a Markdown summary from metrics.jsonl."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt
from matplotlib.ticker import MaxNLocator

from trainer.table import render


def write_report(run_dir: Path, records: list[dict]) -> list[Path]:
    """Write RUN_DIR/report/{perplexity,forgetting,tokens}.png (and staleness.png for a
    merge.mode async run) and summary.md."""
    folder = Path(run_dir) / "report"
    folder.mkdir(exist_ok=True)
    paths = [_plot_per_set(records, "eval_perplexity", folder / "perplexity.png",
                           title="Held-out perplexity per eval set (±1 standard error)",
                           ylabel="perplexity",
                           log=True),
             _plot_per_set(records, "forgetting", folder / "forgetting.png",
                           title="Forgetting per eval set (current / best so far − 1)",
                           ylabel="forgetting"),
             _plot_tokens(records, folder / "tokens.png")]
    stale = [{**r, "most_stale": {site: max(values) for site, values in
                                  r.get("staleness", {}).items() if values}} for r in records]
    if any(r["most_stale"] and max(r["most_stale"].values()) for r in stale):  # async runs
        paths.append(_plot_per_set(stale, "most_stale", folder / "staleness.png",
                                   title="Staleness of each site's merged updates (the "
                                         "largest per version)", ylabel="versions behind"))
    summary = folder / "summary.md"
    summary.write_text(_summary(run_dir, records, paths))
    return [*paths, summary]


def _plot_per_set(records: list[dict], key: str, path: Path, *, title: str, ylabel: str,
                  log: bool = False) -> Path:
    figure, axes = plt.subplots(figsize=(8, 4.5))
    names = sorted({name for r in records for name in r.get(key, {})})
    for name in names:
        points = [(r["round"], r[key][name]) for r in records if name in r.get(key, {})]
        line, = axes.plot(*zip(*points), marker="o", label=name)
        errors = [r.get(f"{key.removesuffix('_perplexity')}_stderr", {}).get(name)
                  for r in records if name in r.get(key, {})]
        if key == "eval_perplexity" and all(e is not None for e in errors):
            rounds, values = zip(*points)  # ±1 standard error, from the bootstrap
            axes.errorbar(rounds, values, yerr=errors, fmt="none", ecolor=line.get_color(),
                          capsize=3, alpha=0.7)
        rejected = [(r["round"], r[key][name]) for r in records
                    if r.get("status") == "rejected" and name in r.get(key, {})]
        if rejected:
            axes.scatter(*zip(*rejected), marker="x", s=90, color="red", zorder=3)
    if any(r.get("status") == "rejected" for r in records):
        axes.scatter([], [], marker="x", color="red", label="rejected candidate")
    if log:
        axes.set_yscale("log")
    axes.set(title=title, xlabel="round", ylabel=ylabel)
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.grid(alpha=0.3)
    if names:
        axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def _plot_tokens(records: list[dict], path: Path) -> Path:
    rounds = [r["round"] for r in records if r["round"] > 0]
    new = [sum(r.get("new_tokens", {}).values()) for r in records if r["round"] > 0]
    replay = [sum(r.get("replay_tokens", {}).values()) for r in records if r["round"] > 0]
    figure, axes = plt.subplots(figsize=(8, 4.5))
    axes.bar(rounds, new, label="new tokens")
    axes.bar(rounds, replay, bottom=new, label="replay tokens")
    axes.set(title="Tokens trained per round, all sites", xlabel="round", ylabel="tokens")
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def _summary(run_dir: Path, records: list[dict], plots: list[Path]) -> str:
    first, last = records[0], records[-1]
    lines = [f"# Tributary run report: {Path(run_dir).name}", "",
             (f"{len(records) - 1} round(s); newest version {last['version']}"
              f" ({last.get('status', 'accepted')})."), "",
             "| eval set | start | now | change | forgetting |", "|---|---|---|---|---|"]
    for name, start in sorted(first.get("eval_perplexity", {}).items()):
        now = last["eval_perplexity"].get(name, float("nan"))
        forgot = last.get("forgetting", {}).get(name, 0.0)
        lines.append(f"| {name} | {start:.3f} | {now:.3f} | {now / start - 1:+.1%} | "
                     f"{forgot:.1%} |")
    if last.get("backward_transfer") is not None or last.get("newest_gain") is not None:
        lines += ["", (f"Since the start: backward transfer "
                       f"{_signed(last.get('backward_transfer'))} (older sets), gain on the newest "
                       f"data {_signed(last.get('newest_gain'))} (relative perplexity change, "
                       "above 0 is better).")]
    rejected = [r for r in records if r.get("status") == "rejected"]
    if rejected:
        lines += ["", "Rejected candidates:"]
        lines += [f"- round {r['round']} ({r['version']}): {'; '.join(r.get('gate', []))}"
                  for r in rejected]
    lines += ["", "## Per round", "", "```", render(records), "```", ""]
    lines += [f"![{p.stem}]({p.name})" for p in plots]
    return "\n".join(lines) + "\n"


def _signed(value: float | None) -> str:
    return "n/a" if value is None else f"{value:+.1%}"
