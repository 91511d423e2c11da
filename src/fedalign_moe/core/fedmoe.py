"""The FedMoE baseline's aggregation (Mei et al. 2024, arXiv 2408.11304), as far as its public text allows.

FedMoE gives each client a sub-MoE chosen from its expert activation pattern and aggregates module by
module: an expert is averaged over the clients whose sub-MoE holds it. What is implemented here:
- sub-MoE of client i in layer l: the fewest experts that cover ``coverage`` of its top-k selections
  in the round (at least k), from the routed-token counts n_i(e) of its training passes;
- expert e = average over the clients whose sub-MoE holds e, weighted by the tokens they routed to
  e; held by nobody: unchanged; router row e: the same weights; other parameters: FedAvg.
Approximated: FedMoE's clients train only their sub-MoE (saving memory); here every client trains the
full model, then chooses its sub-MoE and uploads only those experts (and router rows) with the rest. The "global expert recommendation"
that adjusts sub-MoEs over rounds is the per-round re-selection from fresh activation counts.
Shapes: C clients, L MoE layers, E experts.
"""

from __future__ import annotations

import torch

from .aggregate import LayerNames, fedavg_tensor


def sub_moe(n_E: torch.Tensor, coverage: float, top_k: int) -> torch.Tensor:
    """Boolean [E]: the most-used experts covering ``coverage`` of the selections (at least ``top_k``)."""
    total = float(n_E.sum())
    if total <= 0:
        return torch.zeros_like(n_E, dtype=torch.bool)
    order = torch.argsort(n_E, descending=True, stable=True)  # ties: the lower expert index first
    share = torch.cumsum(n_E[order], 0) / total
    keep = int(torch.searchsorted(share, torch.tensor(coverage, dtype=share.dtype)).item()) + 1
    keep = min(max(keep, top_k), n_E.numel())
    mask = torch.zeros_like(n_E, dtype=torch.bool)
    mask[order[:keep]] = True
    return mask


def sub_moe_LE(n_LE: torch.Tensor, coverage: float, top_k: int) -> torch.Tensor:
    """Boolean [L, E]: one client's sub-MoE in every MoE layer, from its routed-token counts [L, E]."""
    return torch.stack([sub_moe(n_E, coverage, top_k) for n_E in n_LE])


def keep_rows(state: dict[str, torch.Tensor], layers: list[LayerNames], held_LE: torch.Tensor) -> dict[str, torch.Tensor]:
    """What a client uploads: its state with router and expert tensors cut to the held experts' rows."""
    out = dict(state)
    for layer, held_E in zip(layers, held_LE):
        for name in (layer.router, *layer.experts):
            if name in out:
                out[name] = out[name][held_E]
    return out


def restore_rows(sent: dict[str, torch.Tensor], global_state: dict[str, torch.Tensor], layers: list[LayerNames],
                 held_LE: torch.Tensor) -> dict[str, torch.Tensor]:
    """Inverse of ``keep_rows`` on the server: rows of experts the client does not hold take the global value
    (``fedmoe_aggregate`` gives them weight 0). Raises ``ValueError`` when a tensor's rows do not match the mask."""
    out = dict(sent)
    for layer, held_E in zip(layers, held_LE):
        for name in (layer.router, *layer.experts):
            if name in out:
                if out[name].shape[0] != int(held_E.sum()):
                    raise ValueError(f"{name}: {out[name].shape[0]} rows sent for {int(held_E.sum())} held experts")
                full = global_state[name].clone()
                full[held_E] = out[name]
                out[name] = full
    return out


def fedmoe_aggregate(global_state: dict[str, torch.Tensor], client_states: list[dict[str, torch.Tensor]],
                     examples_C: torch.Tensor, n_CLE: torch.Tensor, layers: list[LayerNames], coverage: float,
                     top_k: int, held_CLE: torch.Tensor | None = None) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """New global state and the sub-MoE masks [C, L, E] that decided it (``held_CLE``: the masks the
    clients chose and reported; by default chosen here from the counts)."""
    C, L, E = n_CLE.shape
    if held_CLE is None:
        held_CLE = torch.stack([sub_moe_LE(n_CLE[c], coverage, top_k) for c in range(C)])
    moe_names = {n for layer in layers for n in (layer.router, *layer.experts)}
    fedavg_C = examples_C.double() / examples_C.sum()
    state = {n: (t.clone() if n in moe_names else fedavg_tensor([cs[n] for cs in client_states], fedavg_C))
             for n, t in global_state.items()}
    for l, layer in enumerate(layers):
        mass_CE = torch.where(held_CLE[:, l], n_CLE[:, l].double(), torch.zeros(C, E, dtype=torch.float64))
        for name in (layer.router, *layer.experts):
            if name not in global_state:
                continue  # frozen: does not travel
            for e in range(E):
                if mass_CE[:, e].sum() > 0:
                    w_C = mass_CE[:, e] / mass_CE[:, e].sum()
                    state[name][e] = fedavg_tensor([cs[name][e] for cs in client_states], w_C)
    return state, held_CLE
