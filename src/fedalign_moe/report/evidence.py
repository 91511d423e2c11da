"""The evidence report of a comparison grid: accuracy, convergence, communication and routing diagnostics.

Everything here reads the files a comparison wrote (``results.json`` and each run's directory) and
returns plain rows or figures, so ``fedalign-moe report <comparison dir>`` can redraw it at any time.

Shape legend: C clients, E experts, L MoE layers, R rounds.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from ..files import write_atomic
from ..registry import REFERENCE
from ..runlog import dumps, read_jsonl, read_summary, save_figure
from .paired import MIN_SEEDS_TO_RESOLVE, method_rows, paired_rows, paired_table
from .tables import (
    cell_order,
    draw_comparison,
    group_cells,
    mean_curves,
    mean_std,
    results_table,
    split_name,
    strategy_color,
    write_results_table,
)

logger = logging.getLogger(__name__)

def rounds_to_reach(curve: list[float], target: float) -> int | None:
    """First round (1-based) whose accuracy is at least ``target``; None if it never gets there."""
    for r, acc in enumerate(curve, start=1):
        if acc >= target - 1e-12:
            return r
    return None


def run_dir(summary: dict) -> Path:
    """Where a run's files are: where its summary was found, else its configured ``out_dir``."""
    if "run_dir" in summary:
        return Path(summary["run_dir"])
    return Path(json.loads(summary["config_json"])["out_dir"])


def complete_runs(summaries: list[dict]) -> list[dict]:
    """The runs that ran all their rounds (a run stopped early has a shorter curve and is run again)."""
    return [s for s in summaries if not s.get("stopped_early")]


def collect_summaries(out: Path) -> list[dict]:
    """Every finished run under ``out`` (one ``summary.json`` per run directory), wherever ``out`` now lives."""
    found = []
    for path in sorted(out.glob("*/summary.json")):
        summary = read_summary(path)
        if summary is None:
            logger.warning("skipping %s: damaged (the run counts as unfinished)", path)
            continue
        summary["run_dir"] = str(path.parent)
        found.append(summary)
    return found


def portable(summaries: list[dict]) -> list[dict]:
    """The summaries as ``results.json`` keeps them: without where their folders happen to be now."""
    return [{k: v for k, v in s.items() if k != "run_dir"} for s in summaries]


def _ordered(cells: dict) -> list:
    return sorted(cells, key=cell_order)


def convergence_rows(summaries: list[dict], reference: str = "fedavg") -> list[dict]:
    """Rounds each strategy needs to reach the reference's final accuracy (mean over its seeds), per alpha.

    A seed that never reaches the target is counted in ``reached`` but not in the mean; the ratio is
    the reference's mean rounds over the strategy's (above 1: faster than the reference), given only
    when every seed of both reached the target (otherwise it would compare the lucky seeds).
    """
    cells = group_cells(summaries)
    rows = []
    for alpha in sorted({a for a, _ in cells}, reverse=True):
        ref = cells.get((alpha, reference))
        if not ref:
            continue
        target = float(np.mean([r["final_accuracy"] for r in ref]))
        ref_rounds = [rounds_to_reach(r["accuracy_per_round"], target) for r in ref]
        ref_mean = np.mean(ref_rounds) if all(x is not None for x in ref_rounds) else None
        for key in _ordered(cells):
            if key[0] != alpha or key[1] in REFERENCE:
                continue
            got = [rounds_to_reach(r["accuracy_per_round"], target) for r in cells[key]]
            hit = [x for x in got if x is not None]
            rows.append({"alpha": alpha, "strategy": key[1], "target": target, "rounds": hit,
                         "reached": f"{len(hit)}/{len(got)}",
                         "speedup": (ref_mean / np.mean(hit)) if ref_mean and len(hit) == len(got) else None})
    return rows


def convergence_table(rows: list[dict]) -> str:
    lines = ["| alpha | strategy | target (FedAvg final) | rounds to target | seeds reaching | speed vs FedAvg |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        speed = "-" if r["speedup"] is None else f"{r['speedup']:.2f}x"
        lines.append(f"| {r['alpha']:g} | {r['strategy']} | {r['target']:.3f} | {mean_std(r['rounds'], digits=1)} | "
                     f"{r['reached']} | {speed} |")
    return "\n".join(lines) + "\n"


def communication_rows(summaries: list[dict]) -> list[dict]:
    """Bytes per round per strategy (all clients together), from each run's metrics.jsonl."""
    cells = group_cells(summaries)
    rows = []
    for key in _ordered(cells):
        if key[1] in REFERENCE:
            continue
        up, down, stats, clients = [], [], [], []
        for s in cells[key]:
            for rec in read_jsonl(run_dir(s) / "metrics.jsonl"):
                up.append(rec["uplink_bytes"])
                down.append(rec["downlink_bytes"])
                stats.append(rec.get("stats_uplink_bytes", 0))
                clients.append(len(rec.get("clients", [])) or s["num_clients"])
        if not up:
            continue
        rows.append({"alpha": key[0], "strategy": key[1], "uplink_mb": np.mean(up) / 1e6, "downlink_mb": np.mean(down) / 1e6,
                     "stats_bytes_per_client": float(np.mean(np.array(stats) / np.array(clients))),
                     "stats_share": float(np.sum(stats) / np.sum(up)) if np.sum(up) else 0.0})
    return rows


def communication_table(rows: list[dict]) -> str:
    lines = ["| alpha | strategy | uplink MB / round | downlink MB / round | statistics bytes / client / round "
             "| statistics share of uplink |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['alpha']:g} | {r['strategy']} | {r['uplink_mb']:.1f} | {r['downlink_mb']:.1f} | "
                     f"{r['stats_bytes_per_client']:,.0f} | {100 * r['stats_share']:.3f}% |")
    return "\n".join(lines) + "\n"


def routing_spread(clients: dict[str, list]) -> float:
    """Mean pairwise Jensen-Shannon divergence (nats) between clients' routing distributions.

    ``clients`` maps a client to its routing distribution [L][E]; the divergence is averaged over
    layers. 0 means every client routes its tokens alike; ln 2 is the maximum (disjoint experts).
    """
    p_CLE = np.array(list(clients.values()), dtype=float)
    p_CLE = p_CLE / p_CLE.sum(-1, keepdims=True)
    C = p_CLE.shape[0]
    if C < 2:
        return 0.0

    def kl(a, b):
        return np.sum(np.where(a > 0, a * np.log(np.where(a > 0, a, 1) / np.where(b > 0, b, 1)), 0.0), axis=-1)

    vals = []
    for i in range(C):
        for j in range(i + 1, C):
            m = (p_CLE[i] + p_CLE[j]) / 2
            vals.append(np.mean(0.5 * kl(p_CLE[i], m) + 0.5 * kl(p_CLE[j], m)))
    return float(np.mean(vals))


def routing_concentration(clients: dict[str, list]) -> tuple[float, float]:
    """(largest expert share, entropy / ln E) of each client's routing, averaged over clients and layers.

    A share near 1 and an entropy near 0 mean the router sends almost every token to one expert
    (routing collapse); 1/E and 1 mean tokens spread evenly.
    """
    p_CLE = np.array(list(clients.values()), dtype=float)
    p_CLE = p_CLE / p_CLE.sum(-1, keepdims=True)
    E = p_CLE.shape[-1]
    entropy_CL = -np.sum(np.where(p_CLE > 0, p_CLE * np.log(np.where(p_CLE > 0, p_CLE, 1)), 0.0), axis=-1)
    return float(p_CLE.max(-1).mean()), float((entropy_CL / np.log(E)).mean()) if E > 1 else 0.0


def routing_table(summaries: list[dict]) -> str:
    """Last round's routing per (alpha, strategy): spread between clients and concentration on experts."""
    cells = group_cells(summaries)
    lines = ["| alpha | strategy | spread between clients (JS, nats) | largest expert share | normalised entropy |",
             "|---|---|---|---|---|"]
    for key in _ordered(cells):
        spread, share, entropy = [], [], []
        for s in cells[key]:
            rec = [r for r in read_jsonl(run_dir(s) / "routing.jsonl") if r["clients"]]
            if rec:
                spread.append(routing_spread(rec[-1]["clients"]))
                top, h = routing_concentration(rec[-1]["clients"])
                share.append(top)
                entropy.append(h)
        if spread:
            lines.append(f"| {key[0]:g} | {key[1]} | {mean_std(spread, digits=4)} | {mean_std(share, digits=2)} | "
                         f"{mean_std(entropy, digits=2)} |")
    return "\n".join(lines) + "\n"


def applied_layers(diag: dict) -> list[list]:
    """A round's aligned sets of the layers where semantic expert aggregation acted (a layer whose experts
    did not travel reads "not applied" and is left out)."""
    return [layer for layer in diag.get("aligned", []) if isinstance(layer, list)]


def aligned_fraction(diags: list[dict], num_clients: int) -> list[float]:
    """Per round: mean over layers and experts of |A(e)| / clients of the round (1 = everyone merged)."""
    out = []
    for d in diags:
        layers = applied_layers(d)
        if not layers:  # another strategy's diagnostics (FedMoE's sub-MoEs), or nothing to act on
            continue
        n = len(d.get("clients") or []) or num_clients
        out.append(float(np.mean([[len(a) / n for a in layer] for layer in layers])))
    return out


def alignment_summary(diags: list[dict], num_clients: int) -> dict[str, float]:
    """One run's FedAlign-MoE decisions over all rounds, layers and experts, in plain numbers.

    ``p_g_min``/``p_g_max``: range of the global routing distribution (uniform is 1/E);
    ``alpha_min``/``alpha_max``: range of the adaptive regulariser weights; ``reg``: mean client
    regulariser value (before lambda); ``merged``: mean |A(e)| / clients; ``all_merged`` and
    ``half_or_less``: shares of (round, layer, expert) whose aligned set holds every client, or at most
    half of them; ``cut``: mean share of the round's clients that routed tokens to expert e and were left
    out of A(e) (the updates the threshold discarded; a client that routed nothing to e has no update of
    e to lose), from the rounds that record ``routed``.
    """
    sizes, p_g, alpha, reg, cut = [], [], [], [], []
    for d in diags:
        n = len(d.get("clients") or []) or num_clients
        sizes += [len(a) / n for layer in applied_layers(d) for a in layer]
        for aligned, routed in zip(d.get("aligned", []), d.get("routed") or []):
            if isinstance(aligned, list):  # "not applied": nothing was cut
                cut += [len(set(r) - set(a)) / n for a, r in zip(aligned, routed)]
        p_g += [v for layer in d.get("p_g", []) for v in layer]
        alpha += [v for layer in d.get("alpha", []) for v in layer]
        if d.get("reg_loss") is not None:
            reg.append(d["reg_loss"])
    def stat(values, fn):
        return float(fn(values)) if values else float("nan")
    return {"p_g_min": stat(p_g, np.min), "p_g_max": stat(p_g, np.max), "alpha_min": stat(alpha, np.min),
            "alpha_max": stat(alpha, np.max), "reg": stat(reg, np.mean), "merged": stat(sizes, np.mean),
            "all_merged": stat([x >= 1 - 1e-9 for x in sizes], np.mean),
            "half_or_less": stat([x <= 0.5 for x in sizes], np.mean), "cut": stat(cut, np.mean)}


def _mean_of_known(values: list[float]) -> float:
    """The mean of the values that are not NaN (runs older than a diagnostic lack it); NaN if none is."""
    known = [v for v in values if not np.isnan(v)]
    return float(np.mean(known)) if known else float("nan")


def alignment_table(summaries: list[dict]) -> str:
    """``alignment_summary`` per (alpha, strategy) of the FedAlign-MoE rungs, mean over seeds."""
    cells = group_cells(summaries)
    lines = ["| alpha | strategy | p_g range | alpha(e) range | regulariser | mean |A(e)|/N | all merged | half or fewer merged "
             "| cut with tokens |",
             "|---|---|---|---|---|---|---|---|---|"]
    for key in _ordered(cells):
        if not key[1].startswith("fedalign"):
            continue
        runs = [alignment_summary(read_jsonl(run_dir(s) / "diagnostics.jsonl"), s["num_clients"]) for s in cells[key]]
        runs = [r for r in runs if not np.isnan(r["p_g_min"])]
        if not runs:
            continue
        m = {k: _mean_of_known([r[k] for r in runs]) for k in runs[0]}
        merged = "-" if np.isnan(m["merged"]) else f"{m['merged']:.2f}"
        cut = "-" if np.isnan(m["cut"]) else f"{m['cut']:.2f}"
        lines.append(f"| {key[0]:g} | {key[1]} | {m['p_g_min']:.3f}-{m['p_g_max']:.3f} | {m['alpha_min']:.2f}-{m['alpha_max']:.2f} | "
                     f"{m['reg']:.4f} | {merged} | {100 * m['all_merged']:.0f}% | {100 * m['half_or_less']:.0f}% | {cut} |")
    return "\n".join(lines) + "\n"


def draw_routing_spread(summaries: list[dict], path: Path) -> Path | None:
    """Routing spread between clients per round, one panel per alpha, mean over seeds per strategy."""
    cells = group_cells(summaries)
    alphas = sorted({a for a, _ in cells}, reverse=True)
    fig = Figure(figsize=(5.5 * len(alphas), 4))
    drawn = False
    for i, alpha in enumerate(alphas):
        ax = fig.add_subplot(1, len(alphas), i + 1)
        for key in _ordered(cells):
            if key[0] != alpha:
                continue
            curves = [[routing_spread(r["clients"]) for r in read_jsonl(run_dir(s) / "routing.jsonl") if r["clients"]]
                      for s in cells[key]]
            curves = [c for c in curves if c]
            if not curves:
                continue
            mu, sd = mean_curves(curves)
            x = np.arange(1, len(mu) + 1)
            ax.plot(x, mu, label=key[1], color=strategy_color(key[1]))
            ax.fill_between(x, mu - sd, mu + sd, alpha=0.15, color=strategy_color(key[1]))
            drawn = True
        ax.set(title=f"routing spread between clients, alpha = {alpha:g}", xlabel="round", ylabel="mean pairwise JS (nats)")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    if not drawn:
        return None
    fig.tight_layout()
    save_figure(fig, path, dpi=110)
    return path


def draw_routing_heatmaps(summaries: list[dict], path: Path, alpha: float, seed: int,
                          strategies: tuple[str, ...] = ("fedavg", "fedalign")) -> Path | None:
    """Clients x experts routing distribution of the first MoE layer, first and last round, per strategy."""
    runs = {s["strategy"]: s for s in summaries if s["alpha"] == alpha and s["seed"] == seed and s["strategy"] in strategies}
    panels = []
    for name in strategies:
        if name not in runs:
            continue
        rec = [r for r in read_jsonl(run_dir(runs[name]) / "routing.jsonl") if r["clients"]]
        if rec:
            panels += [(name, rec[0]), (name, rec[-1])]
    if not panels:
        return None
    fig = Figure(figsize=(3.6 * len(panels), 3.8))
    vmax = max(max(max(p[0]) for p in r["clients"].values()) for _, r in panels)
    for i, (name, r) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), i + 1)
        ids = sorted(r["clients"], key=int)
        p_CE = np.array([r["clients"][c][0] for c in ids])
        im = ax.imshow(p_CE, cmap="viridis", aspect="auto", vmin=0, vmax=vmax)
        ax.set(title=f"{name}, round {r['round']}\nspread {routing_spread(r['clients']):.3f}", xlabel="expert", ylabel="client")
        ax.set_yticks(range(len(ids)), ids)
        ax.set_xticks(range(p_CE.shape[1]))
    fig.colorbar(im, ax=fig.axes, fraction=0.02)
    save_figure(fig, path, dpi=110, bbox_inches="tight")
    return path


def draw_aligned_fraction(summaries: list[dict], path: Path) -> Path | None:
    """Mean aligned-set size |A(e)| / clients per round for every strategy that runs semantic aggregation."""
    fig = Figure(figsize=(6, 4))
    ax = fig.add_subplot()
    drawn = False
    cells = group_cells(summaries)
    for key in _ordered(cells):
        curves = [aligned_fraction(read_jsonl(run_dir(s) / "diagnostics.jsonl"), s["num_clients"]) for s in cells[key]]
        curves = [c for c in curves if c]
        if not curves or key[1] in ("fedalign-uniform", "fedalign-consistency", "fedalign-adaptive"):
            continue  # rungs below semantic aggregation merge every client
        mu, sd = mean_curves(curves)
        x = np.arange(1, len(mu) + 1)
        ax.plot(x, mu, marker=".", label=f"{key[1]}, alpha {key[0]:g}")
        ax.fill_between(x, mu - sd, mu + sd, alpha=0.15)
        drawn = True
    if not drawn:
        return None
    ax.set(title="aligned-set size |A(e)| / clients (mean over experts)", xlabel="round", ylabel="fraction of clients merged",
           ylim=(0, 1.05))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)
    return path


def failed_replies(summaries: list[dict]) -> list[str]:
    """Runs in which some client replies failed, with the rounds: their numbers are not comparable."""
    out = []
    for s in summaries:
        bad = [(r["round"], r["failures"]) for r in read_jsonl(run_dir(s) / "metrics.jsonl") if r.get("failures")]
        if bad:
            rounds = ", ".join(f"round {r}: {n}" for r, n in bad)
            out.append(f"{s['strategy']}, alpha {s['alpha']:g}, seed {s['seed']}: failed replies ({rounds})")
    return out


def _against_baselines(summaries: list[dict]) -> list[str]:
    """The section pairing FedAlign-MoE with every other strategy that ran beside it (FedAvg's row is the
    table above): is it ahead of the strongest baseline, and what does each rung below it give?"""
    rows = method_rows(summaries)
    if not rows:
        return []
    return ["## FedAlign-MoE paired with the other strategies", "",
            "FedAlign-MoE (`fedalign`) minus each strategy on the same seed, in points, as above; a row of a "
            "lower rung is what the components above it add.", "", paired_table(rows, method="fedalign")]


def write_evidence(out: Path, summaries: list[dict] | None = None) -> Path:
    """Write ``out/evidence.md`` and its figures from the runs under ``out`` (or the given summaries)."""
    summaries = collect_summaries(out) if summaries is None else summaries
    stopped = [s for s in summaries if s.get("stopped_early")]
    summaries = complete_runs(summaries)
    figures = {
        "accuracy_by_strategy.png": f"global {split_name(summaries)} accuracy per round (mean over seeds, band = std)",
        "routing_spread.png": "how differently clients route (mean pairwise Jensen-Shannon divergence) per round",
        "aligned_fraction.png": "FedAlign-MoE aligned-set sizes per round",
    }
    draw_routing_spread(summaries, out / "routing_spread.png")
    draw_aligned_fraction(summaries, out / "aligned_fraction.png")
    alphas = sorted({s["alpha"] for s in summaries})
    seeds = sorted({s["seed"] for s in summaries})
    for alpha in alphas:
        name = f"routing_heatmap_alpha{alpha:g}.png"
        if draw_routing_heatmaps(summaries, out / name, alpha, seeds[0]):
            figures[name] = f"routing distribution per client, first and last round, alpha {alpha:g}, seed {seeds[0]}"
    failures = failed_replies(summaries) + [
        f"{s['strategy']}, alpha {s['alpha']:g}, seed {s['seed']}: {s['stopped_early']} (left out of every table)" for s in stopped]
    parts = ["# Comparison evidence", "",
             f"{len(summaries)} runs; seeds {', '.join(map(str, seeds))}. Mean ± sample std over seeds. "
             f"Accuracy on the {split_name(summaries)} splits.", "",
             *([f"**Runs with failed clients** (rerun them: delete their folders and compare again): {'; '.join(failures)}", ""]
               if failures else ["Every client reply of every round arrived.", ""]),
             "## Accuracy", "", results_table(summaries),
             "## Paired with FedAvg", "",
             "Strategy minus FedAvg on the same seed (same splits), in points: mean ± the 95% paired-t "
             f"half-width (seeds); * where the interval excludes 0 over at least {MIN_SEEDS_TO_RESOLVE} seeds, "
             "i.e. the data resolve the difference.", "",
             paired_table(paired_rows(summaries)),
             *_against_baselines(summaries),
             "## Convergence", "", convergence_table(convergence_rows(summaries)),
             "## Communication", "", communication_table(communication_rows(summaries)),
             "## Routing at the last round (routing.jsonl)", "", routing_table(summaries),
             "## FedAlign-MoE's decisions (diagnostics.jsonl, mean over seeds)", "", alignment_table(summaries),
             "## Figures", ""]
    parts += [f"- `{name}`: {what}" for name, what in figures.items() if (out / name).exists()]
    path = out / "evidence.md"
    write_atomic(path, "\n".join(parts) + "\n")
    return path


def write_comparison(out: Path) -> Path | None:
    """Write ``results.json``, ``results.md``, the figures and ``evidence.md`` of every finished run under
    ``out`` (runs of earlier calls included, so the four always describe the same runs); the evidence path,
    or None when no run has finished. Raises ``MixedCellError`` when one cell holds runs of two configs."""
    summaries = collect_summaries(out)
    if not summaries:
        return None
    group_cells(summaries)
    write_atomic(out / "results.json", dumps(portable(summaries), indent=2))
    write_results_table(complete_runs(summaries), out / "results.md")
    draw_comparison(summaries, out)
    return write_evidence(out, summaries)
