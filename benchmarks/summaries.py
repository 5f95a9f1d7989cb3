"""The two summaries the benchmarks print: median (min–max) over repeated pairs, and mean ± sd
over seeds. Each benchmark puts this folder on sys.path to import it (run as a script, Python
does that already; the unit tests load benchmarks by path)."""

from __future__ import annotations

import statistics


def median_range(values: list[float], fmt: str = "{:.2f}") -> str:
    """median (min–max) over the pairs."""
    return (f"{fmt.format(statistics.median(values))} ({fmt.format(min(values))}–"
            f"{fmt.format(max(values))})")


def mean_sd(values: list[float], fmt: str = "{:.2f}") -> str:
    """mean ± sample sd over the seeds; a signed format ("{:+.2f}", for paired differences)
    signs the mean only. One seed has no spread to show, and says so rather than print ± 0."""
    mean = fmt.format(statistics.fmean(values))
    if len(values) == 1:
        return f"{mean} (1 seed: no spread)"
    return f"{mean} ± {fmt.replace('+', '').format(statistics.stdev(values))}"
