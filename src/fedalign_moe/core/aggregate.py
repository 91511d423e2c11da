"""One FedAlign-MoE aggregation step over name-keyed parameter dicts (no Flower, no model object).

Routers: component 1 (or the ablation's uniform / FedAvg weights). Experts: component 3 (or FedAvg).
Everything else that travels: example-weighted FedAvg. The MoE layout arrives as plain names.

Cost [ours]: every sum is accumulated in place in float32 (float64 only for the Gram matrices and the
weights), and a client's state is read one tensor at a time, so a client state may be a lazy mapping that
reads a tensor when asked (``federation.protocol.TrainReply.state``: a zero-copy view of the reply's
bytes). Beside the new state, the aggregation holds one 64 MB buffer of update slices (for the Gram
matrices), whatever the number of clients; the experts' tensors are read twice (Gram matrices, then the
update), everything else once.
Shapes: C clients, L MoE layers, E experts, H hidden, P parameters of one expert.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch

from .gate_alignment import (
    adaptive_alpha,
    aggregate_router,
    consistency_weights,
    global_routing_distribution,
    routing_consistency,
)
from .lora_experts import a_view, b_view, fold_a, fold_b, product_gram
from .robust import bounded_shares, trimmed_mean
from .semantic_alignment import align_expert_gram
from .statistics import RoundRoutingStatistics

State = Mapping[str, torch.Tensor]


@dataclass(frozen=True)
class LayerNames:
    router: str
    experts: tuple[str, ...]  # stacked [E, ...]
    lora: tuple[tuple[str, str], ...] = ()  # (A, B) LoRA factors of stacked experts: ``lora_experts``

    def tensor_names(self) -> tuple[str, ...]:
        """The router, the stacked experts and their LoRA factors: every tensor of the layer."""
        return (self.router, *self.experts, *(n for pair in self.lora for n in pair))


class AlignOptions(Protocol):
    """The FedAlign-MoE options the aggregation reads, by name (``config.FedAlignConfig`` is the one
    definition, with the values, defaults and bounds a user sets; anything with these attributes will do)."""

    gate_aggregation: str  # consistency | uniform | fedavg
    adaptive_alpha: bool
    expert_aggregation: str  # semantic | fedavg
    beta: float  # tau = M - beta * S
    omega_times_tokens: bool
    consistency_floor: float  # clients with c_i >= floor stay in A(e) whatever tau says [ours]; inf: the paper's rule
    lora_direction: str  # product | factors: what expert e's LoRA update is compared by
    expert_weights: str  # tokens | examples | routed
    router_share_factor: float | None  # omega_i(e) <= factor x client i's example share [ours]
    # expert e's update over A(e): the weighted mean (None) or a coordinate-wise trimmed mean cutting this
    # share from each end (0.5: the median), scaled by A(e)'s weight, with 3 or more clients in A(e) [ours]
    expert_trim: float | None
    min_aligned_share: float | None  # A(e) holds at least this share of e's clients [ours]
    expert_selection: str  # set | soft: core.semantic_alignment [ours]


@dataclass
class AlignResult:
    state: dict[str, torch.Tensor]
    p_g_LE: torch.Tensor
    alpha_LE: torch.Tensor
    omega_LCE: torch.Tensor
    tau_LE: torch.Tensor
    aligned_LEC: torch.Tensor  # bool: client c in A(e) of layer l
    gamma: dict[tuple[int, int], torch.Tensor] = field(default_factory=dict)  # (l, e) -> [C, C]
    # False for a layer none of whose expert tensors travel (LoRA on the experts): component 3 had nothing
    # to act on there, and its aligned sets mean nothing
    experts_applied_L: torch.Tensor | None = None


def fedavg_tensor(tensors_C: Iterable[torch.Tensor], weights_C: torch.Tensor) -> torch.Tensor:
    """sum_c w_c t_c, accumulated in place in one tensor: one pass over each input, no [C, ...] stack.

    Float32 inputs sum in float32 (weights summing to 1: relative error about C x 6e-8); half-precision
    inputs sum in float32 and come back in their own dtype.
    """
    out, dtype = None, None
    for t, w in zip(tensors_C, weights_C.double().tolist()):
        if out is None:
            dtype = t.dtype
            out = torch.mul(t.float() if t.dtype in (torch.float16, torch.bfloat16) else t, w)
        else:
            out.add_(t, alpha=w)
    if out is None:
        raise ValueError("fedavg_tensor needs at least one tensor")
    return out.to(dtype)


def _router_weights(opts: AlignOptions, stats: RoundRoutingStatistics, l: int, examples_C: torch.Tensor) -> torch.Tensor:
    """omega [C, E] for layer l under the configured gate aggregation."""
    C, E = stats.p_CLE.shape[0], stats.p_CLE.shape[2]
    if opts.gate_aggregation == "uniform":
        return torch.full((C, E), 1.0 / C)
    if opts.gate_aggregation == "fedavg":
        return (examples_C / examples_C.sum()).float()[:, None].expand(C, E).clone()
    s_CE = routing_consistency(stats.o_CLE[:, l], stats.m_CLE[:, l])
    omega_CE = consistency_weights(s_CE, stats.n_CLE[:, l] if opts.omega_times_tokens else None)
    if opts.router_share_factor is not None:
        omega_CE = bounded_shares(omega_CE, opts.router_share_factor * examples_C.double() / examples_C.sum())
    return omega_CE


def _stacked(t: torch.Tensor) -> torch.Tensor:
    return t


def expert_gram(names: Sequence[str], global_state: State, client_states: Sequence[State],
                buffer_floats: int = 1 << 24, views: Mapping[str, Callable] | None = None) -> torch.Tensor:
    """gram [E, C, C] of the clients' expert updates, gram[e, i, j] = <Delta_i[e], Delta_j[e]> over ``names``.

    The updates are taken a slice of columns at a time into one float32 buffer of at most ``buffer_floats``
    (64 MB by default), so the memory it needs does not grow with the number of clients or the expert size.
    ``views[name]`` shows a tensor as [E, ...] (LoRA factors); stacked tensors need none.
    """
    views = views or {}
    E, C = views.get(names[0], _stacked)(global_state[names[0]]).shape[0], len(client_states)
    gram_ECC = torch.zeros(E, C, C, dtype=torch.float64)
    width = max(1, buffer_floats // (C * E))  # columns of one expert per slice
    buffer = torch.empty(C * E * min(width, max(global_state[n].numel() // E for n in names)))
    for n in names:
        view = views.get(n, _stacked)
        g_EP = view(global_state[n]).reshape(E, -1).float()
        x_C = [view(cs[n]).reshape(E, -1) for cs in client_states]  # views (protocol.ArrayView reads without copying)
        for start in range(0, g_EP.shape[1], width):
            stop = min(start + width, g_EP.shape[1])
            delta_CEP = buffer[: C * E * (stop - start)].view(C, E, stop - start)
            for c, x_EP in enumerate(x_C):
                torch.sub(x_EP[:, start:stop], g_EP[:, start:stop], out=delta_CEP[c])
            delta_ECP = delta_CEP.transpose(0, 1)
            gram_ECC += torch.bmm(delta_ECP, delta_ECP.transpose(1, 2)).double()
    return gram_ECC


def apply_expert_weights(global_EX: torch.Tensor, client_tensors_C: Iterable[torch.Tensor],
                         weights_EC: torch.Tensor) -> torch.Tensor:
    """Theta_g[e] + sum_c w_ec Delta_c[e] for every expert e of one stacked tensor [E, ...], folded client by
    client; w_ec are zero outside A(e) and sum to 1 or 0 over c (0: expert e keeps Theta_g[e])."""
    kept_E = 1.0 - weights_EC.double().sum(1)  # 0 where A(e) is non-empty, 1 where nobody moves e
    out_EX = global_EX.float() * kept_E.float().view(-1, *[1] * (global_EX.dim() - 1))
    w_EC = weights_EC.double()
    for c, x_EX in enumerate(client_tensors_C):
        for e in torch.nonzero(w_EC[:, c]).flatten().tolist():
            out_EX[e].add_(x_EX[e], alpha=float(w_EC[e, c]))
    return out_EX.to(global_EX.dtype)


def apply_expert_trimmed(global_EX: torch.Tensor, client_tensors_C: Sequence[torch.Tensor], weights_EC: torch.Tensor,
                         trim: float) -> torch.Tensor:
    """Theta_g[e] + (sum_c w_ec) trimmed-mean over A(e) of Delta_c[e] for every expert e whose A(e) (w_ec > 0)
    holds 3 or more clients; the weighted update of ``apply_expert_weights`` for the others. One expert's
    updates are stacked at a time ([|A(e)|, ...])."""
    w_EC = weights_EC.double()
    trimmed_E = (w_EC > 0).sum(1) >= 3
    out_EX = apply_expert_weights(global_EX, client_tensors_C, torch.where(trimmed_E[:, None], 0.0, w_EC)).float()
    for e in torch.nonzero(trimmed_E).flatten().tolist():  # the weighted merge left these at Theta_g[e]
        members = torch.nonzero(w_EC[e] > 0).flatten().tolist()
        g = global_EX[e].float()
        delta_AX = torch.stack([client_tensors_C[c][e].float() - g for c in members])
        out_EX[e] = g + float(w_EC[e].sum()) * trimmed_mean(delta_AX, trim)
    return out_EX.to(global_EX.dtype)


def _expert_views(layer: LayerNames, global_state: State, E: int) -> dict[str, tuple[Callable, Callable]]:
    """name -> (to [E, ...], back) for every expert tensor of the layer that travels: stacked tensors as
    they are, LoRA factors through ``lora_experts``' views (frozen stacked experts under LoRA do not travel)."""
    views = {n: (_stacked, _stacked) for n in layer.experts if n in global_state}
    for a, b in layer.lora:
        if a in global_state and b in global_state:
            views[a] = (lambda t: a_view(t, E), fold_a)
            views[b] = (lambda t: b_view(t, E), fold_b)
    return views


def _gram(layer: LayerNames, views: dict, global_state: State, client_states: Sequence[State], E: int,
          opts: AlignOptions) -> torch.Tensor:
    """The Gram matrices of the layer's expert updates, LoRA factors compared as ``opts.lora_direction`` says."""
    pairs = [(a, b) for a, b in layer.lora if a in views]
    if opts.lora_direction == "factors" or not pairs:
        return expert_gram(list(views), global_state, client_states, views={n: v[0] for n, v in views.items()})
    gram_ECC = product_gram(pairs, global_state, client_states, E)
    stacked = [n for n in views if n in layer.experts]
    return gram_ECC + expert_gram(stacked, global_state, client_states) if stacked else gram_ECC


def _align_experts(layer: LayerNames, l: int, global_state: State, client_states: Sequence[State], stats: RoundRoutingStatistics,
                   examples_C, opts, result: AlignResult) -> None:
    """Aggregate every expert of one layer into ``result.state``."""
    E, C = stats.p_CLE.shape[2], len(client_states)
    views = _expert_views(layer, global_state, E)
    if not views:
        result.experts_applied_L[l] = False
        return
    if opts.expert_aggregation == "semantic":
        gram_ECC = _gram(layer, views, global_state, client_states, E, opts)
        weights_EC = torch.zeros(E, C, dtype=torch.float64)
        for e in range(E):
            dec = align_expert_gram(stats.mu_CLEH[:, l, e], gram_ECC[e], stats.n_CLE[:, l, e], opts.beta,
                                    opts.consistency_floor, min_share=opts.min_aligned_share,
                                    soft=opts.expert_selection == "soft")
            # "tokens": n_i(e) s_i over A(e), summing to 1; "examples": N_i s_i / N, the left-out share dropped;
            # "routed": N_i s_i over the N of the clients that routed a token to e (those that did not never dilute)
            mass_C = examples_C.double()
            scope = mass_C.sum() if opts.expert_weights != "routed" else (mass_C * (stats.n_CLE[:, l, e] > 0)).sum()
            weights_EC[e] = (dec.weights_C if opts.expert_weights == "tokens"
                             else mass_C * dec.selection_C / scope if scope > 0 else torch.zeros_like(mass_C))
            result.tau_LE[l, e] = dec.tau
            result.aligned_LEC[l, e] = dec.aligned_C
            result.gamma[(l, e)] = dec.gamma_CC
    else:
        weights_EC = (examples_C.double() / examples_C.sum())[None, :].expand(E, C)
        result.aligned_LEC[l] = True
    for n, (to_E, back) in views.items():
        if opts.expert_trim is None or opts.expert_aggregation != "semantic":
            merged = apply_expert_weights(to_E(global_state[n]), (to_E(cs[n]) for cs in client_states), weights_EC)
        else:
            merged = apply_expert_trimmed(to_E(global_state[n]), [to_E(cs[n]) for cs in client_states], weights_EC,
                                          opts.expert_trim)
        result.state[n] = back(merged)


def fedalign_aggregate(global_state: State, client_states: Sequence[State],
                       examples_C: torch.Tensor, stats: RoundRoutingStatistics, layers: list[LayerNames],
                       opts: AlignOptions) -> AlignResult:
    """The new global state and the next round's p_g and alpha.

    ``stats``: the clients' routing statistics stacked on a leading C axis.
    ``client_states`` are read one tensor at a time (they may deserialise on access).
    """
    C, L, E = stats.p_CLE.shape
    fedavg_C = examples_C.double() / examples_C.sum()
    moe_names = {n for layer in layers for n in layer.tensor_names()}
    state = {n: (t if n in moe_names else fedavg_tensor((cs[n] for cs in client_states), fedavg_C))
             for n, t in global_state.items()}  # every MoE entry is replaced below
    result = AlignResult(state, torch.zeros(L, E), torch.ones(L, E), torch.zeros(L, C, E),
                         torch.full((L, E), float("nan")), torch.zeros(L, E, C, dtype=torch.bool),
                         experts_applied_L=torch.ones(L, dtype=torch.bool))
    for l, layer in enumerate(layers):
        omega_CE = _router_weights(opts, stats, l, examples_C)
        result.omega_LCE[l] = omega_CE
        result.p_g_LE[l] = global_routing_distribution(omega_CE, stats.p_CLE[:, l])
        if opts.adaptive_alpha:
            result.alpha_LE[l] = adaptive_alpha(stats.p_CLE[:, l])
        if layer.router in global_state:
            routers_CEH = torch.stack([cs[layer.router] for cs in client_states])
            state[layer.router] = aggregate_router(routers_CEH, omega_CE).to(global_state[layer.router].dtype)
        _align_experts(layer, l, global_state, client_states, stats, examples_C, opts, result)
    return result
