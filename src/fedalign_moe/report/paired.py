"""Paired differences with a reference strategy, over seeds.

Two runs of one seed share the data split, the partition and the model's initialisation, so the
difference strategy - reference on the same seed removes the seed-to-seed swing both share. Over n seeds
the mean difference gets a 95% paired-t interval, mean +- t(0.975, n - 1) * sd / sqrt(n) (scipy's t
quantile); with one seed there is no interval. A difference is "resolved" when its interval excludes 0
and at least ``MIN_SEEDS_TO_RESOLVE`` seeds pair up: with two, the interval rests on one degree of freedom
and on a sample std that the accuracies' granularity (one question in a few hundred) can make near zero by
chance (two seeds each 9 questions apart give +2.2 +- 0.0 points), so it is printed but decides nothing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import stats

from .tables import cell_order, group_cells

METRICS = (("final_accuracy", "global, final"), ("last5_accuracy", "global, last 5"),
           ("final_local_accuracy", "client-own, final"), ("last5_local_accuracy", "client-own, last 5"))
MIN_SEEDS_TO_RESOLVE = 3


@dataclass(frozen=True)
class PairedDifference:
    """strategy - reference over the seeds both ran; ``half_width`` is None below two seeds."""

    mean: float
    half_width: float | None
    n: int
    per_seed: dict[int, float]

    @property
    def resolved(self) -> bool:
        return self.n >= MIN_SEEDS_TO_RESOLVE and self.half_width is not None and abs(self.mean) > self.half_width


def paired_difference(values: dict[int, float], reference: dict[int, float], level: float = 0.95) -> PairedDifference | None:
    """values and reference: seed -> figure; None when they share no seed."""
    seeds = sorted(set(values) & set(reference))
    if not seeds:
        return None
    d = np.array([values[s] - reference[s] for s in seeds], dtype=float)
    half = None
    if len(d) > 1:
        sd = float(d.std(ddof=1))
        half = float(stats.t.ppf(0.5 + level / 2, len(d) - 1)) * sd / math.sqrt(len(d))
    return PairedDifference(float(d.mean()), half, len(d), dict(zip(seeds, d.tolist())))


def _row(alpha: float, strategy: str, runs: list[dict], reference_runs: list[dict]) -> dict:
    """runs − reference_runs for every metric, paired by seed; labelled (alpha, strategy)."""
    row = {"alpha": alpha, "strategy": strategy}
    for key, _ in METRICS:
        mine = {r["seed"]: r[key] for r in runs if r.get(key) is not None}
        theirs = {r["seed"]: r[key] for r in reference_runs if r.get(key) is not None}
        row[key] = paired_difference(mine, theirs)
    return row


def paired_rows(summaries: list[dict], reference: str = "fedavg") -> list[dict]:
    """One row per (alpha, strategy) other than the reference: the paired difference of each metric."""
    cells = group_cells(summaries)
    return [_row(alpha, strategy, cells[(alpha, strategy)], cells[(alpha, reference)])
            for alpha, strategy in sorted(cells, key=cell_order)
            if strategy != reference and (alpha, reference) in cells]


def method_rows(summaries: list[dict], method: str = "fedalign", skip: tuple[str, ...] = ("fedavg",)) -> list[dict]:
    """One row per (alpha, strategy) that ran beside ``method``, other than ``skip``: method − that strategy
    on the same seeds (the method against each baseline; ``paired_rows`` pairs all with one reference)."""
    cells = group_cells(summaries)
    return [_row(alpha, strategy, cells[(alpha, method)], cells[(alpha, strategy)])
            for alpha, strategy in sorted(cells, key=cell_order)
            if strategy != method and strategy not in skip and (alpha, method) in cells]


def format_difference(diff: PairedDifference | None) -> str:
    """Points: mean ± 95% half-width (seeds), * where the difference is resolved."""
    if diff is None:
        return "-"
    if diff.half_width is None:
        return f"{100 * diff.mean:+.1f} (1 seed)"
    mark = " *" if diff.resolved else ""
    return f"{100 * diff.mean:+.1f} ± {100 * diff.half_width:.1f} ({diff.n}){mark}"


def paired_table(rows: list[dict], reference: str = "fedavg", method: str | None = None) -> str:
    """Markdown: points, mean ± 95% half-width (seeds); * where the difference is resolved. Rows of
    ``paired_rows`` are strategy − ``reference``; rows of ``method_rows`` (give ``method``) are method − strategy."""
    head = ([f"{name}: {method} − it" for _, name in METRICS] if method else [f"{name} − {reference}" for _, name in METRICS])
    lines = ["| alpha | " + ("baseline" if method else "strategy") + " | " + " | ".join(head) + " |",
             "|---|---|" + "---|" * len(METRICS)]
    for r in rows:
        lines.append(f"| {r['alpha']:g} | {r['strategy']} | " + " | ".join(format_difference(r[k]) for k, _ in METRICS) + " |")
    return "\n".join(lines) + "\n"
