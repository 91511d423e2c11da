"""The FedMoE baseline as a Flower strategy.

Paper: Mei, Cai, Zhou, Wang, Xu, "FedMoE: Personalized Federated Learning via Heterogeneous Mixture
of Experts", arXiv 2408.11304 (2024). What is implemented and what is approximated: ``core.fedmoe``
and docs/baselines.md. Glue only: the clients' routed-token counts (``routing-n``, sent by every
client) choose each client's sub-MoE; the client uploads only the router rows and experts of its
sub-MoE (``pack_update``), the server puts them back in place (``FedMoE.aggregate_train``) and
``core.fedmoe.fedmoe_aggregate`` does the arithmetic.
"""

from __future__ import annotations

from collections.abc import Iterable
from logging import WARNING

import torch
from flwr.common.logger import log
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from ..core.aggregate import LayerNames
from ..core.fedmoe import fedmoe_aggregate, keep_rows, restore_rows, sub_moe_LE
from ..models.base import MoELayout
from . import keys


def _layers(layout: MoELayout) -> list[LayerNames]:
    return [LayerNames(l.router, l.experts) for l in layout.layers]


def pack_update(state: dict[str, torch.Tensor], layout: MoELayout, n_LE: torch.Tensor,
                coverage: float) -> tuple[ArrayRecord, list[int]]:
    """Client side: the trainable state with MoE tensors cut to the sub-MoE chosen by the counts ``n_LE``,
    and that sub-MoE as the ``fedmoe-held`` metric (0/1 per layer and expert, flattened)."""
    held_LE = sub_moe_LE(n_LE.double(), coverage, layout.top_k)
    return ArrayRecord(keep_rows(state, _layers(layout), held_LE)), held_LE.reshape(-1).int().tolist()


class FedMoE(FedAvg):
    """Module-wise aggregation over activation-chosen sub-MoEs.

    Parameters
    ----------
    layout : MoELayout
        Names of every router and stacked expert tensor.
    coverage : float
        Share of a client's top-k selections its sub-MoE must cover.
    **fedavg_kwargs
        Passed to ``FedAvg``.
    """

    def __init__(self, layout: MoELayout, coverage: float = 0.9, **fedavg_kwargs):
        super().__init__(**fedavg_kwargs)
        self.layout, self.coverage = layout, coverage
        self.global_state: dict[str, torch.Tensor] = {}
        self.held_CLE: torch.Tensor | None = None
        self.last_partition_ids: list[int] = []

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        self.global_state = arrays.to_torch_state_dict()
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        valid, _ = self._check_and_log_replies(replies, is_train=True)
        if not valid:
            return None, None
        L, E = len(self.layout.layers), self.layout.num_experts
        layers = _layers(self.layout)
        contents, states, held, counts = [], [], [], []
        for content in (m.content for m in valid):
            metrics = content[keys.METRICS]
            n_LE = torch.tensor(list(metrics[keys.ROUTING_N]), dtype=torch.float64).reshape(L, E)
            if keys.FEDMOE_HELD in metrics:  # the client sent its sub-MoE only: put the rows back in place
                held_LE = torch.tensor(list(metrics[keys.FEDMOE_HELD])).reshape(L, E).bool()
                try:
                    state = restore_rows(content[self.arrayrecord_key].to_torch_state_dict(), self.global_state,
                                         layers, held_LE)
                except ValueError as err:
                    log(WARNING, "FedMoE: dropping partition %s's update: %s", metrics[keys.PARTITION_ID], err)
                    continue
            else:  # a client that sent the full set: the server chooses its sub-MoE
                held_LE = sub_moe_LE(n_LE, self.coverage, self.layout.top_k)
                state = content[self.arrayrecord_key].to_torch_state_dict()
            contents.append(content), states.append(state), held.append(held_LE), counts.append(n_LE)
        if not contents:
            return None, None
        examples_C = torch.tensor([float(c[keys.METRICS][keys.NUM_EXAMPLES]) for c in contents])
        state, self.held_CLE = fedmoe_aggregate(self.global_state, states, examples_C, torch.stack(counts), layers,
                                                self.coverage, self.layout.top_k, torch.stack(held))
        self.last_partition_ids = [int(c[keys.METRICS][keys.PARTITION_ID]) for c in contents]
        return ArrayRecord(state), self.train_metrics_aggr_fn(contents, self.weighted_by_key)

    def diagnostics(self) -> dict:
        """Each client's sub-MoE (expert indices per layer) in the last round."""
        if self.held_CLE is None:
            return {}
        subs = {str(pid): [torch.nonzero(self.held_CLE[c, l]).flatten().tolist() for l in range(self.held_CLE.shape[1])]
                for c, pid in enumerate(self.last_partition_ids)}
        return {"clients": self.last_partition_ids, "sub_moe": subs}
