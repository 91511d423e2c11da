"""Client routing statistics of FedAlign-MoE (arXiv 2603.21276), per MoE layer.

Computed from the router logits and MoE-input hidden states that the training forward passes already
produce (no second pass over the data). Pure torch; no Flower or transformers import.

Shape legend: T tokens (padding removed), H hidden, E experts, K top-k.

For client i and expert e (spec notation; [ours] marks this project's reading of the paper):
- p(e): routing distribution, mean router probability g_e(h) over tokens.
- n(e): tokens whose local top-k contains e. [ours]
- o(e): expert overlap, Jaccard index over tokens between "e in K_local(h)" and "e in K_global(h)",
  with K_global from the received global router W_g. [ours]
- m(e): routing margin, mean over tokens with e in K_local(h) of g_e(h) - g_(k+1)(h). [ours]
- mu(e): semantic signature, gate-weighted mean hidden state of the tokens routed to e. [summary + ours]
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def topk_mask(probs_TE: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean [T, E]: True where expert e is among token t's top-k."""
    idx_TK = probs_TE.topk(k, dim=-1).indices
    return torch.zeros_like(probs_TE, dtype=torch.bool).scatter_(1, idx_TK, True)


@dataclass
class RoutingStatistics:
    """One client's statistics for one MoE layer (the spec's p, n, o, m, mu)."""

    p_E: torch.Tensor
    n_E: torch.Tensor
    o_E: torch.Tensor
    m_E: torch.Tensor
    mu_EH: torch.Tensor
    tokens: int


class RoutingAccumulator:
    """Running sums over batches; ``result()`` turns them into ``RoutingStatistics``."""

    def __init__(self, num_experts: int, hidden: int, top_k: int):
        E, H = num_experts, hidden
        self.top_k = top_k
        self.prob_sum_E = torch.zeros(E, dtype=torch.float64)
        self.count_E = torch.zeros(E, dtype=torch.float64)
        self.inter_E = torch.zeros(E, dtype=torch.float64)
        self.union_E = torch.zeros(E, dtype=torch.float64)
        self.margin_sum_E = torch.zeros(E, dtype=torch.float64)
        self.mu_num_EH = torch.zeros(E, H, dtype=torch.float64)
        self.mu_den_E = torch.zeros(E, dtype=torch.float64)
        self.tokens = 0

    @torch.no_grad()
    def add(self, logits_TE: torch.Tensor, hidden_TH: torch.Tensor, global_router_EH: torch.Tensor) -> None:
        """Accumulate one batch of real (non-padding) tokens."""
        probs_TE = logits_TE.float().softmax(-1)
        E, k = probs_TE.shape[1], self.top_k
        local_TE = topk_mask(probs_TE, k)
        global_probs_TE = (hidden_TH.float() @ global_router_EH.float().T).softmax(-1)
        global_TE = topk_mask(global_probs_TE, k)
        # g_(k+1)(h): the best probability outside the top-k (0 when every expert is selected)
        kth1_T = probs_TE.topk(k + 1, dim=-1).values[:, k] if k < E else torch.zeros(probs_TE.shape[0])
        routed_TE = probs_TE * local_TE
        self.prob_sum_E += probs_TE.sum(0).double().cpu()
        self.count_E += local_TE.sum(0).double().cpu()
        self.inter_E += (local_TE & global_TE).sum(0).double().cpu()
        self.union_E += (local_TE | global_TE).sum(0).double().cpu()
        self.margin_sum_E += ((probs_TE - kth1_T[:, None]) * local_TE).sum(0).double().cpu()
        self.mu_num_EH += (routed_TE.T @ hidden_TH.float()).double().cpu()
        self.mu_den_E += routed_TE.sum(0).double().cpu()
        self.tokens += probs_TE.shape[0]

    def result(self) -> RoutingStatistics:
        safe = lambda x: x.clamp(min=1e-12)  # noqa: E731  (0/0 -> 0 for unused experts)
        return RoutingStatistics(
            p_E=(self.prob_sum_E / max(self.tokens, 1)).float(),
            n_E=self.count_E.float(),
            o_E=torch.where(self.union_E > 0, self.inter_E / safe(self.union_E), 0.0).float(),
            m_E=torch.where(self.count_E > 0, self.margin_sum_E / safe(self.count_E), 0.0).float(),
            mu_EH=(self.mu_num_EH / safe(self.mu_den_E)[:, None]).float(),
            tokens=self.tokens,
        )
