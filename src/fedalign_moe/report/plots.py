"""Figures of a finished run or comparison, drawn from the files they wrote (never from live objects).

Uses matplotlib's object API (``Figure``), so no global pyplot state is touched.
"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib
import numpy as np
from matplotlib.figure import Figure

from ..runlog import read_jsonl, read_summary, save_figure
from .diagnostics import draw_fedalign


def plot_accuracy(rounds: list[dict], path: Path, title: str) -> Path:
    """Global-test accuracy (and clients' own-test accuracy when present) per round."""
    fig = Figure(figsize=(6, 4))
    ax = fig.add_subplot()
    x = [r["round"] for r in rounds]
    ax.plot(x, [r["accuracy"] for r in rounds], marker="o", label="global model, global test")
    local = [r.get("local_accuracy") for r in rounds]
    if all(v is not None for v in local):
        ax.plot(x, local, marker="s", linestyle="--", label="client models, own test (mean)")
    ax.set(xlabel="round", ylabel="accuracy", title=title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    save_figure(fig, path, dpi=120)
    return path


def plot_partition_counts(counts_CK: np.ndarray, names: list[str], path: Path, title: str) -> Path:
    """Stacked bars: training examples of each class (or subject) per client."""
    counts_CK = np.asarray(counts_CK)
    C, K = counts_CK.shape
    fig = Figure(figsize=(7, 0.35 * C + 1.5))
    ax = fig.add_subplot()
    cmap = matplotlib.colormaps["tab20" if K <= 20 else "turbo"]
    left = np.zeros(C)
    for k in range(K):
        ax.barh(range(C), counts_CK[:, k], left=left, color=cmap(k / max(K - 1, 1)), label=names[k] if K <= 20 else None)
        left += counts_CK[:, k]
    ax.set(xlabel="training examples", ylabel="client", title=title)
    ax.set_yticks(range(C))
    if K <= 20:
        ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.tight_layout()
    save_figure(fig, path, dpi=120)
    return path


def plot_routing(clients: dict[str, list], path: Path, title: str, layer_ids: list[int] | None = None) -> Path:
    """One heatmap per MoE layer: clients (rows) x experts (columns), mean router probability."""
    ids = sorted(clients, key=int)
    p_CLE = np.array([clients[i] for i in ids])
    C, L, E = p_CLE.shape
    layer_ids = layer_ids or list(range(L))
    fig = Figure(figsize=(max(3.2 * L + 1, 6.5), 0.3 * C + 2.2))
    for l in range(L):
        ax = fig.add_subplot(1, L, l + 1)
        im = ax.imshow(p_CLE[:, l, :], vmin=0, vmax=max(float(p_CLE.max()), 1e-6), cmap="viridis", aspect="auto")
        ax.set(title=f"layer {layer_ids[l]}", xlabel="expert", ylabel="client" if l == 0 else None)
        ax.set_xticks(range(E))
        ax.set_yticks(range(C), ids)
        fig.colorbar(im, ax=ax, fraction=0.046)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    save_figure(fig, path, dpi=120)
    return path


def draw_run(run_dir: str | Path) -> list[Path]:
    """Redraw every figure of a run directory; returns the PNG paths written."""
    out = Path(run_dir)
    summary = read_summary(out / "summary.json") or {}
    label = f"{summary.get('strategy', '?')}, alpha={summary.get('alpha', '?')}, seed={summary.get('seed', '?')}"
    written = []
    rounds = read_jsonl(out / "metrics.jsonl")
    if rounds:
        written.append(plot_accuracy(rounds, out / "accuracy.png", f"Accuracy per round ({label})"))
    part = out / "partition.json"
    if part.exists():
        p = json.loads(part.read_text())
        written.append(plot_partition_counts(np.array(p["counts"]), p["names"], out / "partition.png",
                                             f"Training examples per client ({p['partition_key']})"))
    routing = [r for r in read_jsonl(out / "routing.jsonl") if r["clients"]]
    if routing:
        last = routing[-1]
        written.append(plot_routing(last["clients"], out / "routing.png",
                                    f"Mean router probability per client, round {last['round']}\n({label})", last.get("layers")))
    written += draw_fedalign(read_jsonl(out / "diagnostics.jsonl"), out)
    return written
