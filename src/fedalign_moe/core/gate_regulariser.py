"""Component 2 of FedAlign-MoE (arXiv 2603.21276): local gating-distribution regularisation.

    L = L_task + lambda * sum_l L_reg^l
    L_reg = sum_{e in M} alpha(e) * [ p_hat(e) log(p_hat(e) / p_g(e)) - p_hat(e) + p_g(e) ]

p_hat is the batch-mean router distribution (so individual tokens keep their own routing), p_g the
server's global routing distribution, alpha(e) the server's adaptive expert weights and M the
experts selected (top-k) by at least one token of the batch [ours]. Each bracket is the generalised
KL term, >= 0 and zero iff p_hat(e) = p_g(e) [ours: a KL restricted to a subset of experts can be
negative; the generalised form cannot, and over all experts it equals the KL].
The router logits are recomputed from detached hidden states, so the gradient reaches the router
weights only. Shapes: T tokens, H hidden, E experts.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .statistics import topk_mask


def gate_regulariser(router_EH: torch.Tensor, hidden_TH: torch.Tensor, p_g_E: torch.Tensor,
                     alpha_E: torch.Tensor, top_k: int, router_bias_E: torch.Tensor | None = None) -> torch.Tensor:
    """L_reg for one MoE layer and one batch of real tokens; a scalar with gradient to ``router_EH`` (and
    to ``router_bias_E``, for routers whose logits are h W^T + b)."""
    probs_TE = F.linear(hidden_TH.detach().to(router_EH.dtype), router_EH, router_bias_E).float().softmax(-1)
    p_hat_E = probs_TE.mean(0)
    mask_E = topk_mask(probs_TE.detach(), top_k).any(0)
    p_g_E = p_g_E.to(p_hat_E).clamp(min=1e-8)
    term_E = p_hat_E * torch.log(p_hat_E.clamp(min=1e-8) / p_g_E) - p_hat_E + p_g_E
    return (alpha_E.to(p_hat_E) * term_E * mask_E).sum()
