"""Figures of FedAlign-MoE's per-round decisions, drawn from ``diagnostics.jsonl``.

- ``fedalign_omega.png``: consistency weights omega (clients x experts) of the last round, per layer;
- ``fedalign_aligned.png``: aligned-set size |A(e)| per expert over rounds, and the regulariser;
- ``fedalign_p_g.png``: the global routing distribution p_g over rounds, per layer;
- ``fedalign_gamma.png``: pairwise semantic consistency gamma of a few experts, last round.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from ..runlog import save_figure


def _save(fig: Figure, path: Path) -> Path:
    fig.tight_layout()
    save_figure(fig, path, dpi=110)
    return path


def plot_omega(last: dict, path: Path) -> Path:
    omega_LCE = np.array(last["omega"])
    L = omega_LCE.shape[0]
    fig = Figure(figsize=(max(3.5 * L, 6), 4))
    for l in range(L):
        ax = fig.add_subplot(1, L, l + 1)
        im = ax.imshow(omega_LCE[l], cmap="magma", aspect="auto", vmin=0)
        ax.set(title=f"omega, MoE layer {l} (round {last['round']})", xlabel="expert", ylabel="client")
        ax.set_yticks(range(len(last["clients"])), last["clients"])
        fig.colorbar(im, ax=ax, fraction=0.046)
    return _save(fig, path)


def plot_aligned_sizes(diags: list[dict], path: Path) -> Path:
    rounds = [d["round"] for d in diags]
    L = len(diags[-1]["aligned"])
    fig = Figure(figsize=(max(4 * (L + 1), 8), 3.8))
    for l in range(L):
        ax = fig.add_subplot(1, L + 1, l + 1)
        if not isinstance(diags[-1]["aligned"][l], list):  # no expert tensors travel (LoRA experts)
            ax.text(0.5, 0.5, "semantic expert aggregation:\nnot applied\n(no expert tensors travel)",
                    ha="center", va="center", transform=ax.transAxes)
            ax.set(title=f"|A(e)|, MoE layer {l}", xticks=[], yticks=[])
            continue
        sizes_RE = np.array([[len(a) for a in d["aligned"][l]] for d in diags])
        for e in range(sizes_RE.shape[1]):
            ax.plot(rounds, sizes_RE[:, e], marker=".", label=f"e{e}")
        ax.set(title=f"|A(e)|, MoE layer {l}", xlabel="round", ylabel="aligned clients")
        ax.legend(fontsize=6, ncol=2)
    ax = fig.add_subplot(1, L + 1, L + 1)
    ax.plot(rounds, [d.get("reg_loss") or 0.0 for d in diags], marker="o")
    ax.set(title="gate regulariser (client mean)", xlabel="round")
    return _save(fig, path)


def plot_p_g(diags: list[dict], path: Path) -> Path:
    rounds = [d["round"] for d in diags]
    p_RLE = np.array([d["p_g"] for d in diags])
    L = p_RLE.shape[1]
    fig = Figure(figsize=(max(4 * L, 6), 3.5))
    for l in range(L):
        ax = fig.add_subplot(1, L, l + 1)
        ax.stackplot(rounds, p_RLE[:, l, :].T)
        ax.set(title=f"p_g, MoE layer {l}", xlabel="round", ylabel="share", ylim=(0, 1))
    return _save(fig, path)


def plot_gamma(last: dict, path: Path) -> Path | None:
    items = list(last.get("gamma", {}).items())
    if not items:
        return None
    fig = Figure(figsize=(3.2 * len(items), 3.4))
    for i, (name, gamma) in enumerate(items):
        ax = fig.add_subplot(1, len(items), i + 1)
        im = ax.imshow(np.array(gamma), cmap="coolwarm", vmin=-1, vmax=1)
        ax.set(title=name, xlabel="client", ylabel="client")
        ax.set_xticks(range(len(last["clients"])), last["clients"], fontsize=6)
        ax.set_yticks(range(len(last["clients"])), last["clients"], fontsize=6)
        fig.colorbar(im, ax=ax, fraction=0.046)
    return _save(fig, path)


def draw_fedalign(diags: list[dict], out: Path) -> list[Path]:
    """Every FedAlign-MoE figure for a run's diagnostics (empty if the run was not FedAlign-MoE)."""
    diags = [d for d in diags if "omega" in d]
    if not diags:
        return []
    written = [plot_omega(diags[-1], out / "fedalign_omega.png"), plot_aligned_sizes(diags, out / "fedalign_aligned.png"),
               plot_p_g(diags, out / "fedalign_p_g.png")]
    gamma = plot_gamma(diags[-1], out / "fedalign_gamma.png")
    return written + ([gamma] if gamma else [])
