"""Client side of FedAlign-MoE: the gate regulariser in the loss, the routing statistics on the side.

Both read the router records of the training forward passes; nothing runs a second pass over the
data. Shapes: L MoE layers, E experts, H hidden, T tokens.
"""

from __future__ import annotations

import torch

from ..core.gate_regulariser import gate_regulariser
from ..core.statistics import RoutingAccumulator, RoutingStatistics
from ..models.base import MoEAdapter, RoutingRecord


class ClientAligner:
    """Holds what the server sent (p_g, alpha, lambda, the global routers) for one round of training."""

    def __init__(self, adapter: MoEAdapter, p_g_LE: torch.Tensor, alpha_LE: torch.Tensor, reg_lambda: float,
                 stats_noise_sigma: float = 0.0, seed: int = 0):
        self.adapter = adapter
        self.p_g_LE, self.alpha_LE, self.reg_lambda = p_g_LE.float(), alpha_LE.float(), reg_lambda
        # the received global routers, before local training moves them (for the expert overlap o)
        self.global_routers = [adapter.router_weight(l).detach().clone() for l in range(len(adapter.layout.layers))]
        hidden = self.global_routers[0].shape[1]
        self.accumulators = [RoutingAccumulator(adapter.num_experts, hidden, adapter.top_k) for _ in self.global_routers]
        self.noise_sigma = stats_noise_sigma
        self.generator = torch.Generator().manual_seed(seed)
        self.reg_sum, self.reg_batches = 0.0, 0

    def loss(self, records: list[RoutingRecord], keep_T: torch.Tensor) -> torch.Tensor | None:
        """lambda * sum over MoE layers of L_reg on this batch's real tokens (None when lambda = 0)."""
        if self.reg_lambda == 0:
            return None
        total = sum(
            gate_regulariser(self.adapter.router_weight(l), rec.hidden_TH[keep_T], self.p_g_LE[l],
                             self.alpha_LE[l], self.adapter.top_k)
            for l, rec in enumerate(records)
        )
        self.reg_sum += float(total.detach())
        self.reg_batches += 1
        return self.reg_lambda * total

    def observe(self, records: list[RoutingRecord], keep_T: torch.Tensor) -> None:
        for l, rec in enumerate(records):
            self.accumulators[l].add(rec.logits_TE[keep_T], rec.hidden_TH[keep_T], self.global_routers[l])

    def mean_regulariser(self) -> float:
        return self.reg_sum / max(self.reg_batches, 1)

    def statistics(self) -> dict[str, torch.Tensor]:
        """What the client uploads: p, n, o, m [L, E] and mu [L, E, H] (optionally noised, see docs/privacy)."""
        stats: list[RoutingStatistics] = [acc.result() for acc in self.accumulators]
        out = {
            "p": torch.stack([s.p_E for s in stats]), "n": torch.stack([s.n_E for s in stats]),
            "o": torch.stack([s.o_E for s in stats]), "m": torch.stack([s.m_E for s in stats]),
            "mu": torch.stack([s.mu_EH for s in stats]),
        }
        if self.noise_sigma > 0:
            out = self._noised(out)
        return out

    def _noised(self, stats: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Gaussian noise N(0, sigma^2) on every uploaded statistic, then projected back to valid ranges."""
        noisy = {k: v + torch.randn(v.shape, generator=self.generator) * self.noise_sigma * self._scale(k, v)
                 for k, v in stats.items()}
        noisy["p"] = noisy["p"].clamp(min=0)
        noisy["p"] = noisy["p"] / noisy["p"].sum(-1, keepdim=True).clamp(min=1e-12)
        noisy["n"] = noisy["n"].clamp(min=0).round()
        noisy["o"] = noisy["o"].clamp(0, 1)
        noisy["m"] = noisy["m"].clamp(0, 1)
        return noisy

    @staticmethod
    def _scale(key: str, value: torch.Tensor) -> float:
        """Noise is relative to each statistic's natural range: 1 for p, o, m; the mean for n; the RMS for mu."""
        if key == "n":
            return float(value.mean().clamp(min=1.0))
        if key == "mu":
            return float(value.pow(2).mean().sqrt().clamp(min=1e-6))
        return 1.0
