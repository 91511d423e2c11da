"""Tables and plots of a comparison grid: mean +- std over seeds for every (strategy, alpha) cell."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.figure import Figure

from ..config import Config, UserError, deep_merge, with_legacy
from ..files import write_atomic
from ..registry import SPECS, table_position
from ..runlog import save_figure

# No "best round" column: picking the best round on the test split would be tuning on it.
COLUMNS = (
    ("final_accuracy", "global acc (final)"),
    ("last5_accuracy", "global acc (last 5)"),
    ("final_local_accuracy", "client acc, own test (final)"),
    ("last5_local_accuracy", "client acc, own test (last 5)"),
    ("uplink_bytes_total", "uplink MB"),
    ("wall_seconds", "wall s"),
)


# floor and ceiling in greys, the method in red with its ablation rungs in lighter reds, each baseline a hue
# of its own; a strategy added since takes tab20's colour at its registry place
_COLOURS = {"centralised": "black", "local": "0.6", "fedavg": "tab:blue", "fedprox": "tab:orange", "fedmoe": "tab:purple",
            "fedavgm": "tab:green", "fedadagrad": "tab:olive", "fedadam": "tab:cyan", "fedyogi": "tab:pink",
            "fedtrimmedavg": "tab:brown", "fedmedian": "#8c6d31", "krum": "#393b79", "multikrum": "#6b6ecf",
            "bulyan": "#637939", "fedalign-uniform": "#fcbba1", "fedalign-consistency": "#fb6a4a",
            "fedalign-adaptive": "#cb181d", "fedalign": "#67000d"}


def strategy_color(name: str) -> tuple | str:
    """The colour a strategy has in every figure of every comparison (grey for a name the registry does not know)."""
    if name in _COLOURS:
        return _COLOURS[name]
    return colormaps["tab20"](table_position(name) % 20) if name in SPECS else "0.5"


def cell_order(key: tuple[float, str]) -> tuple:
    """Sort key of an (alpha, strategy) cell: alpha descending, then the registry's order (the floor and
    the ceiling first, the baselines, then the ablation ladder upwards)."""
    return (-key[0], table_position(key[1]), key[1])


class MixedCellError(UserError):
    """Runs that would share a table cell were configured differently; one line for the user."""


def _flat(tree: dict, prefix: str = "") -> dict[str, object]:
    out: dict[str, object] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


# May differ between the runs of one cell: the seed, where files go, and the machine it ran on.
_NOT_SETUP = {"seed", "out_dir", "preset", "model.prefix_cache_dir", "model.device", "train.torch_threads",
              "federation.client_cpus", "federation.client_gpus", "federation.round_timeout",
              "federation.stop_after_silent_rounds", "federation.node_wait_seconds",
              "federation.min_available_nodes", "output.tensorboard"}


def _setup(summary: dict) -> dict[str, object]:
    """A run's config with defaults filled in (runs written before a field existed used its default, or
    the value ``config.LEGACY`` names), less the options its strategy never reads (``Config.result_key``)."""
    raw = json.loads(summary["config_json"])
    try:
        tree = Config.from_stored(raw).result_key()
    except ValueError:  # an older config this version cannot read: compare what it says over the defaults
        tree = deep_merge(Config().model_dump(mode="json"), with_legacy(raw))
    flat = {k: v for k, v in _flat(tree).items() if k not in _NOT_SETUP}
    flat["strategy_revision"] = summary.get("strategy_revision", 1)
    return flat


def _check_same_setup(cell: tuple[float, str], runs: list[dict]) -> None:
    configs = [_setup(r) for r in runs if "config_json" in r]
    for other in configs[1:]:
        differ = sorted(k for k in configs[0].keys() | other.keys() if configs[0].get(k) != other.get(k))
        if differ:
            raise MixedCellError(f"runs of {cell[1]} at alpha {cell[0]:g} differ in {', '.join(differ[:4])}: "
                                 f"a table cell would average different setups; keep each setup in its own folder")


def group_cells(summaries: list[dict]) -> dict[tuple[float, str], list[dict]]:
    """Runs grouped by (alpha, strategy): one cell of every table, its seeds inside.

    Raises ``MixedCellError`` when the runs of one cell differ in anything but the seed and the machine,
    or when test-split and validation-split runs share a folder.
    """
    if len(holdouts(summaries)) > 1:
        raise MixedCellError("test-split and validation-split runs (data.holdout) share one folder; keep them apart")
    cells: dict[tuple[float, str], list[dict]] = defaultdict(list)
    for s in summaries:
        cells[(s["alpha"], s["strategy"])].append(s)
    for cell, runs in cells.items():
        _check_same_setup(cell, runs)
    return cells


def mean_curves(curves: list[list[float]]) -> tuple[np.ndarray, np.ndarray]:
    """Mean and std per round over curves of possibly different lengths (missing rounds ignored)."""
    arr = np.full((len(curves), max(len(c) for c in curves)), np.nan)
    for i, c in enumerate(curves):
        arr[i, :len(c)] = c
    return np.nanmean(arr, 0), np.nanstd(arr, 0)


def mean_std(values: list[float | None], scale: float = 1.0, digits: int = 3) -> str:
    vals = [v * scale for v in values if v is not None]
    if not vals:
        return "-"
    if len(vals) == 1:
        return f"{vals[0]:.{digits}f}"
    return f"{np.mean(vals):.{digits}f} ± {np.std(vals, ddof=1):.{digits}f}"


def results_table(summaries: list[dict]) -> str:
    """Markdown table, one row per (alpha, strategy), mean ± sample std over seeds."""
    head = "| alpha | strategy | seeds | " + " | ".join(name for _, name in COLUMNS) + " |"
    lines = [head, "|" + "---|" * (3 + len(COLUMNS))]
    for (alpha, strategy), runs in sorted(group_cells(summaries).items(), key=lambda kv: cell_order(kv[0])):
        cols = []
        for key, _ in COLUMNS:
            if key == "uplink_bytes_total":
                cols.append(mean_std([r[key] for r in runs], 1e-6, 1))
            elif key == "wall_seconds":
                cols.append(mean_std([r[key] for r in runs], 1.0, 0))
            else:
                cols.append(mean_std([r.get(key) for r in runs]))
        lines.append(f"| {alpha:g} | {strategy} | {len(runs)} | " + " | ".join(cols) + " |")
    return "\n".join(lines) + "\n"


def holdouts(summaries: list[dict]) -> set[str]:
    """The evaluation splits of these runs: ``"test"``, or ``"validation"`` for tuning runs."""
    return {json.loads(s["config_json"]).get("data", {}).get("holdout", "test") for s in summaries if "config_json" in s}


def split_name(summaries: list[dict]) -> str:
    """``"validation"`` for a folder of tuning runs, else ``"test"``."""
    return "validation" if "validation" in holdouts(summaries) else "test"


def write_results_table(summaries: list[dict], path: Path) -> Path:
    split = split_name(summaries)
    note = ("\n\nTuning runs: the evaluation splits are validation splits carved from the training pool "
            "(`data.holdout = \"validation\"`); the test split was not read." if split == "validation" else "")
    write_atomic(path, f"# Results\n\nMean ± std over seeds (sample std). Accuracy of the global model on the "
                    f"global {split} split, and of each client's own model on its own {split} split.{note}\n\n"
                    + results_table(summaries))
    return path


def draw_comparison(summaries: list[dict], out: Path) -> list[Path]:
    """Accuracy per round, one panel per alpha, one line (mean over seeds, band = std) per strategy."""
    written = []
    cells = group_cells(summaries)
    alphas = sorted({a for a, _ in cells}, reverse=True)
    fig = Figure(figsize=(5.5 * len(alphas), 4))
    for i, alpha in enumerate(alphas):
        ax = fig.add_subplot(1, len(alphas), i + 1)
        for (a, strategy), runs in sorted(cells.items(), key=lambda kv: cell_order(kv[0])):
            if a != alpha:
                continue
            curves = [r["accuracy_per_round"] for r in runs if r["accuracy_per_round"] and not r.get("stopped_early")]
            if not curves:
                continue
            mu, sd = mean_curves(curves)
            x = np.arange(1, len(mu) + 1)
            ax.plot(x, mu, label=strategy, color=strategy_color(strategy))
            ax.fill_between(x, mu - sd, mu + sd, alpha=0.15, color=strategy_color(strategy))
        ax.set(title=f"Dirichlet alpha = {alpha:g}", xlabel="round", ylabel=f"global {split_name(summaries)} accuracy")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path = out / "accuracy_by_strategy.png"
    save_figure(fig, path, dpi=120)
    written.append(path)
    return written
