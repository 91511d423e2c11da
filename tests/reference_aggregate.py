"""The float64 FedAlign-MoE aggregation as it was before issue 13 (commit 233bd45), kept as the reference the
streaming float32 implementation (core.aggregate) is checked against; ``expert_weights = examples``
(issue 9) added as one line in ``_align_experts``.

Routers: component 1 (or the ablation's uniform / FedAvg weights). Experts: component 3 (or FedAvg).
Everything else that travels: example-weighted FedAvg. The MoE layout arrives as plain names.
Shapes: C clients, L MoE layers, E experts, H hidden, P parameters of one expert.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from fedalign_moe.config import FedAlignConfig
from fedalign_moe.core.aggregate import AlignOptions, LayerNames
from fedalign_moe.core.gate_alignment import (
    adaptive_alpha,
    aggregate_router,
    consistency_weights,
    global_routing_distribution,
    routing_consistency,
)
from fedalign_moe.core.semantic_alignment import align_expert
from fedalign_moe.core.statistics import RoundRoutingStatistics


def spec_options(**options) -> FedAlignConfig:
    """FedAlign-MoE's options with the paper's alignment rule (no consistency floor), ``options`` on top."""
    return FedAlignConfig(**{"consistency_floor": float("inf"), **options})


def apply_expert_update(global_P: torch.Tensor, delta_CP: torch.Tensor, weights_C: torch.Tensor) -> torch.Tensor:
    """Theta_g + sum_i w_i Delta_i (weights are zero outside the aligned set)."""
    return global_P + torch.einsum("c,cp->p", weights_C.to(delta_CP.dtype), delta_CP)


@dataclass
class AlignResult:
    state: dict[str, torch.Tensor]
    p_g_LE: torch.Tensor
    alpha_LE: torch.Tensor
    omega_LCE: torch.Tensor
    tau_LE: torch.Tensor
    aligned_LEC: torch.Tensor  # bool: client c in A(e) of layer l
    gamma: dict[tuple[int, int], torch.Tensor] = field(default_factory=dict)  # (l, e) -> [C, C]


def fedavg_tensor(tensors_C: list[torch.Tensor], weights_C: torch.Tensor) -> torch.Tensor:
    stacked = torch.stack([t.double() for t in tensors_C])
    return torch.einsum("c,c...->...", weights_C.double(), stacked).to(tensors_C[0].dtype)


def _router_weights(opts: AlignOptions, stats: RoundRoutingStatistics, l: int, examples_C: torch.Tensor) -> torch.Tensor:
    """omega [C, E] for layer l under the configured gate aggregation."""
    C, E = stats.p_CLE.shape[0], stats.p_CLE.shape[2]
    if opts.gate_aggregation == "uniform":
        return torch.full((C, E), 1.0 / C)
    if opts.gate_aggregation == "fedavg":
        return (examples_C / examples_C.sum()).float()[:, None].expand(C, E).clone()
    s_CE = routing_consistency(stats.o_CLE[:, l], stats.m_CLE[:, l])
    return consistency_weights(s_CE, stats.n_CLE[:, l] if opts.omega_times_tokens else None)


def _align_experts(layer: LayerNames, l: int, global_state, client_states, stats, examples_C, opts, result: AlignResult):
    """Aggregate every expert of one layer in place in ``result.state``."""
    names = [n for n in layer.experts if n in global_state]  # frozen experts (e.g. LoRA) do not travel
    if not names:
        return
    E = global_state[names[0]].shape[0]
    for e in range(E):
        delta_CP = torch.stack([torch.cat([(cs[n][e] - global_state[n][e]).reshape(-1).double() for n in names])
                                for cs in client_states])
        if opts.expert_aggregation == "semantic":
            dec = align_expert(stats.mu_CLEH[:, l, e], delta_CP, stats.n_CLE[:, l, e], opts.beta, opts.consistency_floor)
            weights_C, result.tau_LE[l, e] = dec.weights_C, dec.tau  # expert_weights = tokens
            if opts.expert_weights == "examples":  # FedAvg's share inside A(e), the rest keeps the global value
                weights_C = torch.where(dec.aligned_C, examples_C.double(), 0.0) / examples_C.double().sum()
            result.aligned_LEC[l, e] = dec.aligned_C
            result.gamma[(l, e)] = dec.gamma_CC
        else:
            weights_C = examples_C.double() / examples_C.sum()
            result.aligned_LEC[l, e] = True
        flat_P = torch.cat([global_state[n][e].reshape(-1).double() for n in names])
        new_P = apply_expert_update(flat_P, delta_CP, weights_C)
        offset = 0
        for n in names:
            size = global_state[n][e].numel()
            result.state[n][e] = new_P[offset:offset + size].reshape(global_state[n][e].shape).to(global_state[n].dtype)
            offset += size


def fedalign_aggregate(global_state: dict[str, torch.Tensor], client_states: list[dict[str, torch.Tensor]],
                       examples_C: torch.Tensor, stats: RoundRoutingStatistics, layers: list[LayerNames],
                       opts: AlignOptions) -> AlignResult:
    """The new global state and the next round's p_g and alpha.

    ``stats`` holds the clients' uploads stacked on a leading C axis: p, n, o, m [C, L, E], mu [C, L, E, H].
    """
    C, L, E = stats.p_CLE.shape
    fedavg_C = examples_C.double() / examples_C.sum()
    moe_names = {n for layer in layers for n in (layer.router, *layer.experts)}
    state = {n: (t.clone() if n in moe_names else fedavg_tensor([cs[n] for cs in client_states], fedavg_C))
             for n, t in global_state.items()}
    result = AlignResult(state, torch.zeros(L, E), torch.ones(L, E), torch.zeros(L, C, E),
                         torch.full((L, E), float("nan")), torch.zeros(L, E, C, dtype=torch.bool))
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
