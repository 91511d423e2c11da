"""The FedMoE baseline as a Flower strategy.

Paper: Mei, Cai, Zhou, Wang, Xu, "FedMoE: Personalized Federated Learning via Heterogeneous Mixture
of Experts", arXiv 2408.11304 (2024). What is implemented and what is approximated: ``core.fedmoe``
and docs/baselines.md. Glue only: the round asks clients for their sub-MoE
(``protocol.request_sub_moe``); each client chooses it from its routed-token counts and uploads only
those router rows and experts; the server puts them back in place (``core.fedmoe.restore_rows``) and
``core.fedmoe.fedmoe_aggregate`` does the arithmetic.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from ..core.aggregate import LayerNames
from ..core.fedmoe import fedmoe_aggregate, restore_rows
from . import protocol
from .protocol import TrainReply
from .screening import ReplyPolicy, ScreenedReplies


class FedMoE(ScreenedReplies, FedAvg):
    """Module-wise aggregation over activation-chosen sub-MoEs.

    Parameters
    ----------
    policy : ReplyPolicy
        The model layout and the bounds replies are checked against.
    coverage : float
        Share of a client's top-k selections its sub-MoE must cover.
    **fedavg_kwargs
        Passed to ``FedAvg``.
    """

    def __init__(self, policy: ReplyPolicy, coverage: float = 0.9, **fedavg_kwargs):
        super().__init__(policy, **fedavg_kwargs)
        self.coverage = coverage
        self.held_CLE: torch.Tensor | None = None
        self.last_partition_ids: list[int] = []

    @classmethod
    def from_config(cls, cfg, policy, **flower_kwargs):
        return cls(policy, cfg.federation.fedmoe_coverage, **flower_kwargs)

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        protocol.request_sub_moe(config, self.coverage)
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_replies(self, server_round: int, replies: list[TrainReply]) -> tuple[ArrayRecord, MetricRecord]:
        layers = [LayerNames(l.router, l.experts) for l in self.policy.layout.layers]
        states = [restore_rows(r.arrays.to_torch_state_dict(), self.global_state, layers, r.sub_moe_LE) for r in replies]
        examples_C = torch.tensor([r.weight for r in replies], dtype=torch.float64)  # bounded by the screen
        counts_CLE = torch.stack([r.routing.n_LE.double() for r in replies])
        state, self.held_CLE = fedmoe_aggregate(self.global_state, states, examples_C, counts_CLE, layers, self.coverage,
                                                self.policy.layout.top_k, torch.stack([r.sub_moe_LE for r in replies]))
        self.last_partition_ids = [r.partition_id for r in replies]
        return ArrayRecord(state), self.train_metrics_aggr_fn([r.weighted_content() for r in replies], protocol.NUM_EXAMPLES)

    def diagnostics(self) -> dict:
        """Each client's sub-MoE (expert indices per layer) in the last round."""
        if self.held_CLE is None:
            return {}
        subs = {str(pid): [torch.nonzero(self.held_CLE[c, l]).flatten().tolist() for l in range(self.held_CLE.shape[1])]
                for c, pid in enumerate(self.last_partition_ids)}
        return {"clients": self.last_partition_ids, "sub_moe": subs}
