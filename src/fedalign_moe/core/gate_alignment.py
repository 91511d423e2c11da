"""Component 1 of FedAlign-MoE (arXiv 2603.21276): routing-consistency weighted gate alignment.

For one MoE layer with C clients and E experts:
    s_i(e)     = o_i(e) * m_i(e)                       routing consistency (overlap x margin)
    omega_i(e) = s_i(e) / sum_j s_j(e)                 per-expert client weights
    p_g(e)     = sum_i omega_i(e) p_i(e), renormalised over e      global routing distribution
    W_g[e]     = sum_i omega_i(e) W_i[e]               router row e [ours]
Pure torch; shapes: C clients, E experts, H hidden.
"""

from __future__ import annotations

import torch


def routing_consistency(o_CE: torch.Tensor, m_CE: torch.Tensor) -> torch.Tensor:
    """s = o * m, shape [C, E] (the spec: the product beats either factor alone)."""
    return o_CE * m_CE


def consistency_weights(s_CE: torch.Tensor, tokens_CE: torch.Tensor | None = None) -> torch.Tensor:
    """omega [C, E], columns summing to 1.

    With ``tokens_CE`` the consistency is multiplied by the tokens behind it [ours: option
    ``omega_times_tokens``], so a tiny client cannot outweigh large ones on confidence alone.
    A column whose scores are all zero (no client routed to e) falls back to uniform weights.
    """
    score_CE = s_CE.clamp(min=0) * (tokens_CE if tokens_CE is not None else 1.0)
    total_E = score_CE.sum(0, keepdim=True)
    uniform_CE = torch.full_like(score_CE, 1.0 / score_CE.shape[0])
    return torch.where(total_E > 0, score_CE / total_E.clamp(min=1e-12), uniform_CE)


def global_routing_distribution(omega_CE: torch.Tensor, p_CE: torch.Tensor) -> torch.Tensor:
    """p_g [E] = sum_i omega_i(e) p_i(e), renormalised to sum to 1 over experts."""
    p_E = (omega_CE * p_CE).sum(0)
    return p_E / p_E.sum().clamp(min=1e-12)


def aggregate_router(router_CEH: torch.Tensor, omega_CE: torch.Tensor) -> torch.Tensor:
    """Row e of the global router = sum_i omega_i(e) W_i[e]; shape [E, H]."""
    return torch.einsum("ce,ceh->eh", omega_CE.to(router_CEH.dtype), router_CEH)


def adaptive_alpha(p_CE: torch.Tensor) -> torch.Tensor:
    """alpha(e) = clip(1 - std_i p_i(e) / mean_i p_i(e), 0, 1), shape [E] [ours].

    Strong regularisation for experts every client uses alike, weak for client-specific ones.
    """
    mean_E = p_CE.mean(0)
    std_E = p_CE.std(0, unbiased=False)
    return (1.0 - std_E / mean_E.clamp(min=1e-12)).clamp(0.0, 1.0)
