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
    """Running sums over batches; ``result()`` turns them into ``RoutingStatistics``.

    The sums stay on the device of the tensors they are fed (float64) and reach the CPU once, in
    ``result()``; padding is masked by multiplication, not by indexing: a per-batch copy to the host or
    a boolean index (which waits for the device to know the count) would stall a GPU every step.
    """

    def __init__(self, num_experts: int, hidden: int, top_k: int):
        self.E, self.H, self.top_k = num_experts, hidden, top_k
        self.sums_6E: torch.Tensor | None = None  # prob, count, inter, union, margin, mu_den
        self.mu_num_EH: torch.Tensor | None = None
        self.tokens_: torch.Tensor | None = None  # real tokens seen, on the device

    @torch.no_grad()
    def add(self, logits_TE: torch.Tensor, hidden_TH: torch.Tensor, global_router_EH: torch.Tensor,
            keep_T: torch.Tensor | None = None) -> None:
        """Accumulate one batch; only tokens where ``keep_T`` is true count (all when None)."""
        probs_TE = logits_TE.float().softmax(-1)
        E, k = probs_TE.shape[1], self.top_k
        w_T1 = (keep_T.float() if keep_T is not None else probs_TE.new_ones(probs_TE.shape[0]))[:, None]
        local_TE = topk_mask(probs_TE, k).float() * w_T1
        global_probs_TE = (hidden_TH.float() @ global_router_EH.to(probs_TE.device, torch.float32).T).softmax(-1)
        global_TE = topk_mask(global_probs_TE, k).float() * w_T1
        # g_(k+1)(h): the best probability outside the top-k (0 when every expert is selected)
        kth1_T = probs_TE.topk(k + 1, dim=-1).values[:, k] if k < E else probs_TE.new_zeros(probs_TE.shape[0])
        routed_TE = probs_TE * local_TE
        both_TE = local_TE * global_TE
        batch_6E = torch.stack([(probs_TE * w_T1).sum(0), local_TE.sum(0), both_TE.sum(0),
                                (local_TE + global_TE - both_TE).sum(0), ((probs_TE - kth1_T[:, None]) * local_TE).sum(0),
                                routed_TE.sum(0)]).double()
        mu_EH = (routed_TE.T @ hidden_TH.float()).double()
        if self.sums_6E is None:
            self.sums_6E, self.mu_num_EH = torch.zeros_like(batch_6E), torch.zeros_like(mu_EH)
            self.tokens_ = batch_6E.new_zeros(())
        self.sums_6E += batch_6E
        self.mu_num_EH += mu_EH
        self.tokens_ += w_T1.sum().double()

    @property
    def tokens(self) -> int:
        return 0 if self.tokens_ is None else int(self.tokens_.item())

    def result(self) -> RoutingStatistics:
        safe = lambda x: x.clamp(min=1e-12)  # noqa: E731  (0/0 -> 0 for unused experts)
        if self.sums_6E is None:
            sums_6E, mu_num_EH = torch.zeros(6, self.E, dtype=torch.float64), torch.zeros(self.E, self.H, dtype=torch.float64)
        else:
            sums_6E, mu_num_EH = self.sums_6E.cpu(), self.mu_num_EH.cpu()
        prob_sum_E, count_E, inter_E, union_E, margin_sum_E, mu_den_E = sums_6E
        return RoutingStatistics(
            p_E=(prob_sum_E / max(self.tokens, 1)).float(),
            n_E=count_E.float(),
            o_E=torch.where(union_E > 0, inter_E / safe(union_E), 0.0).float(),
            m_E=torch.where(count_E > 0, margin_sum_E / safe(count_E), 0.0).float(),
            mu_EH=(mu_num_EH / safe(mu_den_E)[:, None]).float(),
            tokens=self.tokens,
        )


@dataclass
class ModelRoutingStatistics:
    """One client's statistics for every MoE layer, stacked: p, n, o, m [L, E], mu [L, E, H]; ``tokens``
    real tokens were routed in each layer."""

    p_LE: torch.Tensor
    n_LE: torch.Tensor
    o_LE: torch.Tensor
    m_LE: torch.Tensor
    mu_LEH: torch.Tensor
    tokens: int

    @classmethod
    def stack(cls, layers: list[RoutingStatistics]) -> ModelRoutingStatistics:
        return cls(torch.stack([s.p_E for s in layers]), torch.stack([s.n_E for s in layers]),
                   torch.stack([s.o_E for s in layers]), torch.stack([s.m_E for s in layers]),
                   torch.stack([s.mu_EH for s in layers]), layers[0].tokens if layers else 0)


@dataclass(frozen=True)
class RoundRoutingStatistics:
    """A round's statistics of C clients, stacked client-first: p, n, o, m [C, L, E], mu [C, L, E, H]. What
    the server's aggregation (``core.aggregate.fedalign_aggregate``) reads."""

    p_CLE: torch.Tensor
    n_CLE: torch.Tensor
    o_CLE: torch.Tensor
    m_CLE: torch.Tensor
    mu_CLEH: torch.Tensor

    @classmethod
    def stack(cls, clients: list[ModelRoutingStatistics]) -> RoundRoutingStatistics:
        return cls(torch.stack([s.p_LE for s in clients]), torch.stack([s.n_LE for s in clients]),
                   torch.stack([s.o_LE for s in clients]), torch.stack([s.m_LE for s in clients]),
                   torch.stack([s.mu_LEH for s in clients]))
