"""FedAlign-MoE as a Flower strategy.

Paper: Fang, Wang, An, Lin, Deng, Chen, Fang, "Aggregation Alignment for Federated Learning with
Mixture-of-Experts under Data Heterogeneity", arXiv 2603.21276 (2026).

Glue only: ``configure_train`` adds the global routing distribution p_g, the adaptive expert weights
alpha and lambda to FedAvg's message; ``aggregate_train`` checks the replies, then hands the
arithmetic to ``core.aggregate.fedalign_aggregate``. Each reply carries three records: the trainable
``arrays``, the ``metrics`` and the routing statistics (``fedalign-stats``).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from ..config import FedAlignConfig
from ..core.aggregate import AlignOptions, AlignResult, LayerNames, fedalign_aggregate
from ..models.base import MoELayout
from . import keys

STATE = "fedalign-state"  # server -> client: p_g [L, E], alpha [L, E]
STATS = "fedalign-stats"  # client -> server: p, n, o, m [L, E], mu [L, E, H]
REG_LAMBDA = "reg-lambda"
STATS_NOISE = "stats-noise-sigma"
REG_VALUE = "reg-loss"
STAT_KEYS = ("p", "n", "o", "m", "mu")


def to_tensor(array) -> torch.Tensor:
    """A Flower ``Array`` as a torch tensor (a copy)."""
    return torch.from_numpy(array.numpy().copy())


class ReplyError(ValueError):
    """A client's reply lacks a record FedAlign-MoE needs, or its shapes disagree with the layout."""


class FedAlignMoE(FedAvg):
    """FedAlign-MoE: consistency-weighted gate alignment, gate regularisation, semantic expert aggregation.

    Parameters
    ----------
    layout : MoELayout
        Names of every router and stacked expert tensor (plain data from the model adapter).
    options : FedAlignConfig
        The method's switches (the ablation rung) and its [ours] choices.
    **fedavg_kwargs
        Passed to ``FedAvg`` (sampling, record keys).
    """

    def __init__(self, layout: MoELayout, options: FedAlignConfig, **fedavg_kwargs):
        super().__init__(**fedavg_kwargs)
        self.layout, self.options = layout, options
        L, E = len(layout.layers), layout.num_experts
        self.p_g_LE = torch.full((L, E), 1.0 / E)  # round 1: uniform target
        self.alpha_LE = torch.ones(L, E)  # round 1: alpha = 1 everywhere (spec)
        self.global_state: dict[str, torch.Tensor] = {}
        self.last: AlignResult | None = None
        self.last_partition_ids: list[int] = []

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        self.global_state = arrays.to_torch_state_dict()
        config[REG_LAMBDA] = self.options.reg_lambda if self.options.gate_regulariser else 0.0
        config[STATS_NOISE] = self.options.stats_noise_sigma
        messages = list(super().configure_train(server_round, arrays, config, grid))
        state = ArrayRecord({"p_g": self.p_g_LE.clone(), "alpha": self.alpha_LE.clone()})
        for msg in messages:
            msg.content[STATE] = state
        return messages

    def _check(self, msg: Message) -> None:
        content = msg.content
        for key in (self.arrayrecord_key, keys.METRICS, STATS):
            if key not in content:
                raise ReplyError(f"reply from node {msg.metadata.src_node_id} lacks record {key!r}")
        shape = tuple(content[STATS]["p"].shape)
        if shape != (len(self.layout.layers), self.layout.num_experts):
            raise ReplyError(f"routing statistics of shape {shape} do not match the layout")

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        valid = [m for m in replies if not m.has_error()]
        for msg in valid:
            self._check(msg)
        if not valid:
            return None, None
        contents = [m.content for m in valid]
        examples_C = torch.tensor([float(c[keys.METRICS][keys.NUM_EXAMPLES]) for c in contents])
        stats = {k: torch.stack([to_tensor(c[STATS][k]).float() for c in contents]) for k in STAT_KEYS}
        layers = [LayerNames(l.router, l.experts) for l in self.layout.layers]
        o = self.options
        opts = AlignOptions(o.gate_aggregation, o.adaptive_alpha, o.expert_aggregation, o.beta, o.omega_times_tokens,
                            o.consistency_floor)
        result = fedalign_aggregate(self.global_state, [c[self.arrayrecord_key].to_torch_state_dict() for c in contents],
                                    examples_C, stats, layers, opts)
        self.p_g_LE, self.alpha_LE, self.last = result.p_g_LE, result.alpha_LE, result
        self.last_partition_ids = [int(c[keys.METRICS][keys.PARTITION_ID]) for c in contents]
        return ArrayRecord(result.state), self.train_metrics_aggr_fn(contents, self.weighted_by_key)

    def diagnostics(self, max_gamma: int = 4) -> dict:
        """What the last aggregation decided, as JSON-ready lists (clients named by partition id)."""
        if self.last is None:
            return {}
        r, ids = self.last, self.last_partition_ids
        aligned = [[[ids[c] for c in range(len(ids)) if r.aligned_LEC[l, e, c]] for e in range(r.aligned_LEC.shape[1])]
                   for l in range(r.aligned_LEC.shape[0])]
        gamma = {f"layer{l}-expert{e}": g.tolist() for (l, e), g in list(r.gamma.items())[:max_gamma]}
        return {"clients": ids, "omega": r.omega_LCE.tolist(), "p_g": r.p_g_LE.tolist(), "alpha": r.alpha_LE.tolist(),
                "tau": [[None if t != t else t for t in row] for row in r.tau_LE.tolist()], "aligned": aligned,
                "gamma": gamma}
