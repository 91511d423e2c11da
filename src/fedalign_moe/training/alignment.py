"""Client side of the routing statistics and of FedAlign-MoE's gate regulariser.

Both read the router records of the training forward passes; nothing runs a second pass over the
data. ``RoutingObserver`` collects the statistics every strategy reports (one accumulator for all);
``ClientAligner`` adds FedAlign-MoE's regulariser to the loss and noises the upload when asked.
Shapes: L MoE layers, E experts, H hidden, T tokens.
"""

from __future__ import annotations

import torch

from ..core.gate_regulariser import gate_regulariser
from ..core.statistics import ModelRoutingStatistics, RoutingAccumulator
from ..models.base import MoEAdapter, RoutingRecord


class RoutingObserver:
    """The spec's p, n, o, m, mu over the real tokens of a client's training passes.

    The routers of the model as received (the global routers) are kept at construction, before local
    training moves them: the expert overlap o compares the local top-k with theirs.
    """

    def __init__(self, adapter: MoEAdapter):
        self.global_routers = [adapter.router_weight(l).detach().clone() for l in range(len(adapter.layout.layers))]
        hidden = self.global_routers[0].shape[1]
        self.accumulators = [RoutingAccumulator(adapter.num_experts, hidden, adapter.top_k) for _ in self.global_routers]

    def observe(self, records: list[RoutingRecord], keep_T: torch.Tensor) -> None:
        for l, rec in enumerate(records):
            self.accumulators[l].add(rec.logits_TE, rec.hidden_TH, self.global_routers[l], rec.real(keep_T))

    def result(self) -> ModelRoutingStatistics:
        return ModelRoutingStatistics.stack([acc.result() for acc in self.accumulators])


class ClientAligner:
    """What the server sent for one round of FedAlign-MoE training (p_g, alpha, lambda, noise)."""

    def __init__(self, adapter: MoEAdapter, p_g_LE: torch.Tensor, alpha_LE: torch.Tensor, reg_lambda: float,
                 stats_noise_sigma: float = 0.0, seed: int = 0):
        self.adapter = adapter
        self.p_g_LE, self.alpha_LE, self.reg_lambda = p_g_LE.float(), alpha_LE.float(), reg_lambda
        self.noise_sigma = stats_noise_sigma
        self.generator = torch.Generator().manual_seed(seed)
        self.reg_sum, self.reg_batches = 0.0, 0

    def loss(self, records: list[RoutingRecord], keep_T: torch.Tensor) -> torch.Tensor | None:
        """lambda * sum over MoE layers of L_reg on this batch's real tokens (None when lambda = 0)."""
        if self.reg_lambda == 0:
            return None
        total = sum(
            gate_regulariser(self.adapter.router_weight(l), rec.hidden_TH[rec.real(keep_T)], self.p_g_LE[l],
                             self.alpha_LE[l], self.adapter.top_k, self.adapter.router_bias(l))
            for l, rec in enumerate(records)
        )
        self.reg_sum += float(total.detach())
        self.reg_batches += 1
        return self.reg_lambda * total

    def mean_regulariser(self) -> float:
        return self.reg_sum / max(self.reg_batches, 1)

    def upload(self, stats: ModelRoutingStatistics) -> ModelRoutingStatistics:
        """The statistics as uploaded: noised when the server asked for noise (see docs/privacy)."""
        if self.noise_sigma <= 0:
            return stats
        fields = {"p": stats.p_LE, "n": stats.n_LE, "o": stats.o_LE, "m": stats.m_LE, "mu": stats.mu_LEH}
        noisy = {k: v + torch.randn(v.shape, generator=self.generator) * self.noise_sigma * self._scale(k, v)
                 for k, v in fields.items()}
        p = noisy["p"].clamp(min=0)
        return ModelRoutingStatistics(
            p_LE=p / p.sum(-1, keepdim=True).clamp(min=1e-12), n_LE=noisy["n"].clamp(0, stats.tokens).round(),
            o_LE=noisy["o"].clamp(0, 1), m_LE=noisy["m"].clamp(0, 1), mu_LEH=noisy["mu"], tokens=stats.tokens)

    @staticmethod
    def _scale(key: str, value: torch.Tensor) -> float:
        """Noise is relative to each statistic's natural range: 1 for p, o, m; the mean for n; the RMS for mu."""
        if key == "n":
            return float(value.mean().clamp(min=1.0))
        if key == "mu":
            return float(value.pow(2).mean().sqrt().clamp(min=1e-6))
        return 1.0
