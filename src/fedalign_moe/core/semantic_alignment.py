"""Component 3 of FedAlign-MoE (arXiv 2603.21276): semantic-aware expert aggregation.

For one expert e of one MoE layer, over the round's C clients:
    gamma_ij = cos(mu_i, mu_j) * max(0, cos(Delta_i, Delta_j))     pairwise semantic consistency [ours]
    c_i      = mean_{j != i} gamma_ij
    tau      = mean_i c_i - beta * std_i c_i                          adaptive threshold [paper; M, S ours]
    A        = {i : (c_i >= tau or c_i >= floor) and n_i > 0}        aligned set [floor: ours]
    Theta_g' = Theta_g + sum_{i in A} w_i Delta_i,  w_i = n_i / sum_{A} n     [ours; core.aggregate.apply_expert_weights]
               or w_i = N_i / sum_all N (FedAvg's weights, the left-out share dropped: ``expert_weights``) [ours]
Clients outside A, and clients that routed no token to e, do not move expert e; an empty A keeps it.
The absolute ``floor`` [ours] keeps clients whose consistency is high in absolute terms: without it,
"mean - beta * std" drops the least consistent client even when every client agrees (std ~ 0).
Two more ways to keep agreeing clients [ours]: ``min_share`` (A holds at least that share of the
clients that routed to e, the most consistent first: a majority floor), and ``soft`` selection (no hard set:
every client that routed to e weighs its mass times s_i = clamp(c_i / max_j c_j, 0, 1), so the most
consistent keeps its whole weight and a client whose expert plays another role, c_i <= 0, none).
Cost: one C x C Gram matrix per expert (``align_expert_gram`` takes it ready-made, so the caller can sum
it over tensors and never hold an expert's whole update); no per-pair copies of expert weights.
Shapes: C clients, H hidden, P parameters of one expert (flattened).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


def cosine_matrix(x_CD: torch.Tensor) -> torch.Tensor:
    """Pairwise cosine similarities [C, C]; a zero row has similarity 0 with everything."""
    unit_CD = F.normalize(x_CD.double(), dim=1)
    return unit_CD @ unit_CD.T


def cosine_from_gram(gram_CC: torch.Tensor) -> torch.Tensor:
    """Pairwise cosines [C, C] from the Gram matrix of inner products; a zero vector has cosine 0 with all."""
    norm_C = gram_CC.double().diagonal().clamp(min=0).sqrt()
    scale_CC = norm_C[:, None] * norm_C[None, :]
    return torch.where(scale_CC > 0, gram_CC.double() / scale_CC.clamp(min=1e-300), torch.zeros_like(scale_CC))


def semantic_consistency(mu_CH: torch.Tensor, delta_cos_CC: torch.Tensor) -> torch.Tensor:
    """gamma [C, C]: role similarity times (non-negative) update-direction consensus (cosines of the updates)."""
    return cosine_matrix(mu_CH) * delta_cos_CC.clamp(min=0.0)


def client_consistency(gamma_CC: torch.Tensor) -> torch.Tensor:
    """c_i = mean over j != i of gamma_ij, shape [C] (0 for a single client)."""
    C = gamma_CC.shape[0]
    if C < 2:
        return torch.zeros(C, dtype=gamma_CC.dtype)
    off_CC = gamma_CC * (1 - torch.eye(C, dtype=gamma_CC.dtype))
    return off_CC.sum(1) / (C - 1)


def adaptive_threshold(c_C: torch.Tensor, beta: float) -> torch.Tensor:
    """tau = M - beta * S, M and S the mean and (population) std of the clients' consistencies."""
    return c_C.mean() - beta * c_C.std(unbiased=False)


@dataclass
class ExpertAlignment:
    """The decision for one expert, kept for diagnostics."""

    gamma_CC: torch.Tensor
    c_C: torch.Tensor
    tau: float
    aligned_C: torch.Tensor  # bool
    weights_C: torch.Tensor  # sum to 1 over the aligned set, 0 elsewhere
    selection_C: torch.Tensor | None = None  # the share of its mass each client brings: 1/0 for a set, s_i when soft


def aligned_weights(aligned_C: torch.Tensor, mass_C: torch.Tensor, renormalise: bool) -> torch.Tensor:
    """w [C]: ``mass_C`` inside A (``aligned_C``, bool), 0 outside, divided by the mass of A (``renormalise``:
    the weights sum to 1 over A) or by the mass of every client (they sum to A's share: the left-out
    clients' share of the update is dropped, not handed to the others)."""
    inside_C = torch.where(aligned_C, mass_C.double(), torch.zeros_like(mass_C, dtype=torch.float64))
    total = inside_C.sum() if renormalise else mass_C.double().sum()
    return inside_C / total if total > 0 else inside_C


def align_expert(mu_CH: torch.Tensor, delta_CP: torch.Tensor, n_C: torch.Tensor, beta: float,
                 floor: float = float("inf"), tolerance: float = 1e-9) -> ExpertAlignment:
    """Aligned set and aggregation weights for one expert (``floor = inf``: the spec's rule alone)."""
    delta_CP = delta_CP.double()
    return align_expert_gram(mu_CH, delta_CP @ delta_CP.T, n_C, beta, floor, tolerance)


def with_majority(aligned_C: torch.Tensor, c_C: torch.Tensor, active_C: torch.Tensor, min_share: float) -> torch.Tensor:
    """``aligned_C`` grown, most consistent first, to at least ceil(min_share x the active clients)."""
    need = math.ceil(min_share * int(active_C.sum()) - 1e-9)
    if int(aligned_C.sum()) >= need:
        return aligned_C
    rank_C = torch.where(active_C, c_C.double(), torch.full_like(c_C, -math.inf, dtype=torch.float64))
    grown_C = aligned_C.clone()
    grown_C[rank_C.argsort(descending=True)[:need]] = True
    return grown_C & active_C


def soft_selection(c_C: torch.Tensor, active_C: torch.Tensor) -> torch.Tensor:
    """s [C] in [0, 1]: c_i / max_j c_j over the active clients, negatives 0 (all 0 when none is positive)."""
    top = float(torch.where(active_C, c_C.double(), torch.zeros_like(c_C, dtype=torch.float64)).max())
    if top <= 0:
        return torch.zeros_like(c_C, dtype=torch.float64)
    return torch.where(active_C, (c_C.double() / top).clamp(0.0, 1.0), torch.zeros_like(c_C, dtype=torch.float64))


def align_expert_gram(mu_CH: torch.Tensor, gram_CC: torch.Tensor, n_C: torch.Tensor, beta: float,
                      floor: float = float("inf"), tolerance: float = 1e-9, min_share: float | None = None,
                      soft: bool = False) -> ExpertAlignment:
    """``align_expert`` from the Gram matrix of the expert's updates, gram_ij = <Delta_i, Delta_j>;
    ``min_share`` and ``soft``: the module docstring's [ours] variants (``aligned_C`` is then every client
    with a positive weight)."""
    gamma_CC = semantic_consistency(mu_CH, cosine_from_gram(gram_CC))
    c_C = client_consistency(gamma_CC)
    tau = float(adaptive_threshold(c_C, beta))
    active_C = n_C > 0
    if soft:
        s_C = soft_selection(c_C, active_C)
        return ExpertAlignment(gamma_CC, c_C, tau, s_C > 0, aligned_weights(s_C > 0, n_C.double() * s_C, renormalise=True),
                               s_C)
    aligned_C = ((c_C >= tau - tolerance) | (c_C >= floor)) & active_C
    if min_share is not None:
        aligned_C = with_majority(aligned_C, c_C, active_C, min_share)
    return ExpertAlignment(gamma_CC, c_C, tau, aligned_C, aligned_weights(aligned_C, n_C, renormalise=True),
                           aligned_C.double())
