"""Does FedAlign-MoE's premise hold on a testbed? Its figures, per model recipe.

- expert specialisation: mutual information (nats) between the expert a token is routed to (top-k
  selections) and its example's label, on the global test split, per MoE layer; and the per-label
  routing shares (a heatmap);
- client routing divergence under FedAvg: the mean pairwise Jensen-Shannon divergence (nats) between the
  clients' routing distributions at the first and the last round (``evidence.routing_spread``);
- the non-IID drop: centralised minus FedAvg accuracy on the global test split, in points.
``premise.json`` holds them keyed by recipe; ``premise_routing.png`` draws the heatmaps.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from ..files import write_atomic
from ..runlog import dumps, read_jsonl, save_figure
from .evidence import routing_spread


def mutual_information(counts_KE: np.ndarray) -> float:
    """I(label; expert) in nats from a [labels, experts] count table (0 for an empty table)."""
    total = counts_KE.sum()
    if total <= 0:
        return 0.0
    p_KE = counts_KE / total
    outer_KE = p_KE.sum(1, keepdims=True) * p_KE.sum(0, keepdims=True)
    ratio = np.divide(p_KE, outer_KE, out=np.ones_like(p_KE), where=p_KE > 0)
    return float(np.sum(p_KE * np.log(ratio)))


def routing_shares(counts_KE: np.ndarray) -> np.ndarray:
    """Each label's share of selections per expert (rows sum to 1; an unseen label is a row of 0)."""
    totals = counts_KE.sum(1, keepdims=True)
    return np.divide(counts_KE, totals, out=np.zeros_like(counts_KE, dtype=float), where=totals > 0)


def spread_by_round(run: Path) -> tuple[float | None, float | None]:
    """(first round's, last round's) mean pairwise JS divergence of the clients' routing in a run folder."""
    records = [r for r in read_jsonl(run / "routing.jsonl") if r.get("clients")]
    if not records:
        return None, None
    return routing_spread(records[0]["clients"]), routing_spread(records[-1]["clients"])


def recipe_figures(counts_LKE: np.ndarray, label_names: list[str], fedavg: dict | None, centralised: dict | None,
                   fedavg_dir: Path | None, build_seconds: float | None) -> dict:
    """The premise figures of one recipe: MI and shares from ``counts_LKE``, the rest from its runs' summaries."""
    mi_L = [mutual_information(c) for c in counts_LKE]
    label_entropy = mutual_information(np.diag(counts_LKE[0].sum(1)))  # H(label) = I(label; label)
    first, last = spread_by_round(fedavg_dir) if fedavg_dir is not None else (None, None)
    acc = {name: (s or {}).get("final_accuracy") for name, s in (("fedavg", fedavg), ("centralised", centralised))}
    drop = None if None in acc.values() else 100 * (acc["centralised"] - acc["fedavg"])
    return {
        "mi_expert_label_nats": float(np.mean(mi_L)), "mi_by_layer_nats": mi_L, "label_entropy_nats": label_entropy,
        "routing_js_first_round_nats": first, "routing_js_last_round_nats": last,
        "fedavg_accuracy": acc["fedavg"], "centralised_accuracy": acc["centralised"], "non_iid_drop_points": drop,
        "labels": label_names, "routing_shares_by_layer": [routing_shares(c).tolist() for c in counts_LKE],
        "build_seconds": build_seconds,
    }


FIGURE_KEYS = ("mi_expert_label_nats", "mi_by_layer_nats", "label_entropy_nats", "routing_js_first_round_nats",
               "routing_js_last_round_nats", "fedavg_accuracy", "centralised_accuracy", "non_iid_drop_points", "labels",
               "routing_shares_by_layer", "build_seconds")


def is_recipe_figures(value) -> bool:
    """Whether ``value`` (read back from a premise.json) holds one recipe's figures as ``recipe_figures`` writes them."""
    return isinstance(value, dict) and set(FIGURE_KEYS) <= set(value)


def draw_premise(premise: dict, path: Path) -> Path:
    """Per recipe (rows) and MoE layer (columns): each label's routing shares over the experts."""
    recipes = list(premise)
    L = max(len(p["routing_shares_by_layer"]) for p in premise.values())
    fig = Figure(figsize=(3.4 * L + 1, 2.4 * len(recipes) + 0.6))
    for r, recipe in enumerate(recipes):
        p = premise[recipe]
        for l, shares in enumerate(p["routing_shares_by_layer"]):
            ax = fig.add_subplot(len(recipes), L, r * L + l + 1)
            im = ax.imshow(np.array(shares), cmap="viridis", vmin=0, vmax=1, aspect="auto")
            ax.set_title(f"{recipe}, MoE layer {l}: I = {p['mi_by_layer_nats'][l]:.3f} nats", fontsize=8)
            ax.set_yticks(range(len(p["labels"])), p["labels"], fontsize=7)
            ax.set_xlabel("expert", fontsize=7)
            fig.colorbar(im, ax=ax, fraction=0.046)
    fig.suptitle("Share of each label's tokens routed to each expert (global test split, before training)", fontsize=9)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)
    return path


def write_premise(premise: dict, out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / "premise.json", dumps(premise, indent=1))
    draw_premise(premise, out / "premise_routing.png")
    return out / "premise.json"


def premise_table(premise: dict) -> str:
    """premise.json as a Markdown table, one row per recipe."""
    def num(v, fmt):
        return "-" if v is None else format(v, fmt)

    lines = ["| recipe | I(expert; label), nats | routing JS first / last round, nats | FedAvg | centralised | "
             "non-IID drop, points | build s |", "|---|---|---|---|---|---|---|"]
    for recipe, p in premise.items():
        lines.append(f"| {recipe} | {p['mi_expert_label_nats']:.3f} (of {p['label_entropy_nats']:.2f}) | "
                     f"{num(p['routing_js_first_round_nats'], '.4f')} / {num(p['routing_js_last_round_nats'], '.4f')} | "
                     f"{num(p['fedavg_accuracy'], '.3f')} | {num(p['centralised_accuracy'], '.3f')} | "
                     f"{num(p['non_iid_drop_points'], '.1f')} | {num(p['build_seconds'], '.0f')} |")
    return "\n".join(lines) + "\n"
