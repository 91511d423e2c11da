"""FedAlign-MoE as a Flower strategy.

Paper: Fang, Wang, An, Lin, Deng, Chen, Fang, "Aggregation Alignment for Federated Learning with
Mixture-of-Experts under Data Heterogeneity", arXiv 2603.21276 (2026).

Glue only: ``configure_train`` attaches the global routing distribution p_g, the adaptive expert
weights alpha and lambda to FedAvg's message (``protocol.attach_alignment``); the replies are screened
(``screening.ScreenedReplies``), then ``aggregate_replies`` hands the arithmetic to
``core.aggregate.fedalign_aggregate``. With personalised experts [ours] each client's message also says
which experts it keeps (outside A(e) in the last round it took part in: ``core.personal``).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from ..config import FedAlignConfig
from ..core.aggregate import AlignResult, fedalign_aggregate
from ..core.personal import personal_mask_LEC
from ..core.statistics import RoundRoutingStatistics
from . import protocol
from .protocol import AlignmentTarget, TrainReply
from .screening import ReplyPolicy, ScreenedReplies

NOT_APPLIED = "not applied"  # a layer's aligned sets when none of its expert tensors travel (LoRA experts)


class FedAlignMoE(ScreenedReplies, FedAvg):
    """FedAlign-MoE: consistency-weighted gate alignment, gate regularisation, semantic expert aggregation.

    Parameters
    ----------
    policy : ReplyPolicy
        The model layout (names of every router and stacked expert tensor) and the bounds replies are
        checked against.
    options : FedAlignConfig
        The method's switches (the ablation rung) and its [ours] choices.
    **fedavg_kwargs
        Passed to ``FedAvg`` (sampling, record keys).
    """

    def __init__(self, policy: ReplyPolicy, options: FedAlignConfig, **fedavg_kwargs):
        super().__init__(policy, **fedavg_kwargs)
        self.options = options
        L, E = len(policy.layout.layers), policy.layout.num_experts
        self.p_g_LE = torch.full((L, E), 1.0 / E)  # round 1: uniform target
        self.alpha_LE = torch.ones(L, E)  # round 1: alpha = 1 everywhere (spec)
        self.last: AlignResult | None = None
        self.last_partition_ids: list[int] = []
        self.last_routed_LEC: torch.Tensor | None = None  # bool: client c routed a token to expert e of layer l
        # personalised experts: node id -> bool [L, E], the experts that node keeps (None: not personalising)
        self.personal_by_node: dict[int, torch.Tensor] | None = {} if options.personal_experts else None

    @classmethod
    def from_config(cls, cfg, policy, **flower_kwargs):
        """Every rung of the ablation ladder: the run's FedAlign-MoE options with the rung's switches applied."""
        return cls(policy, cfg.effective_fedalign(), **flower_kwargs)

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        o = self.options
        if o.proximal_mu > 0:  # [ours] FedProx's anchor on the weights, asked for as FedProx asks
            config[protocol.PROXIMAL_MU] = o.proximal_mu
        messages = super().configure_train(server_round, arrays, config, grid)
        target = AlignmentTarget(self.p_g_LE, self.alpha_LE, o.reg_lambda if o.gate_regulariser else 0.0, o.stats_noise_sigma)
        for msg in messages:
            protocol.attach_alignment(msg.content, target)
        if self.personal_by_node is not None:
            self.sent = messages = [self.personalise(msg) for msg in messages]
        return messages

    def personalise(self, msg: Message) -> Message:
        """The message for one node, naming the experts it keeps (none before its first aggregated reply)."""
        node = msg.metadata.dst_node_id
        mask_LE = self.personal_by_node.get(node, torch.zeros_like(self.p_g_LE, dtype=torch.bool))
        return Message(content=protocol.with_personal_experts(msg.content, mask_LE),
                       message_type=msg.metadata.message_type, dst_node_id=node)

    def aggregate_replies(self, server_round: int, replies: list[TrainReply]) -> tuple[ArrayRecord, MetricRecord]:
        examples_C = torch.tensor([r.weight for r in replies], dtype=torch.float64)  # bounded by the screen
        stats = RoundRoutingStatistics.stack([r.routing for r in replies])
        layers = [l.names() for l in self.policy.layout.layers]
        result = fedalign_aggregate(self.global_state, [r.state() for r in replies],
                                    examples_C, stats, layers, self.options)
        self.p_g_LE, self.alpha_LE, self.last = result.p_g_LE, result.alpha_LE, result
        self.last_partition_ids = [r.partition_id for r in replies]
        self.last_routed_LEC = (stats.n_CLE > 0).permute(1, 2, 0)  # who sent expert e any token: A(e)'s candidates
        if self.personal_by_node is not None:
            keep_LEC = personal_mask_LEC(result.aligned_LEC, result.experts_applied_L)
            self.personal_by_node.update({r.node_id: keep_LEC[:, :, c] for c, r in enumerate(replies)})
        return ArrayRecord(result.state), self.train_metrics_aggr_fn([r.weighted_content() for r in replies],
                                                                     protocol.NUM_EXAMPLES)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"p_g": self.p_g_LE.clone(), "alpha": self.alpha_LE.clone()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if set(state) != {"p_g", "alpha"} or state["p_g"].shape != self.p_g_LE.shape or state["alpha"].shape != self.alpha_LE.shape:
            raise ValueError(f"FedAlign-MoE state needs p_g and alpha of shape {tuple(self.p_g_LE.shape)}")
        self.p_g_LE, self.alpha_LE = state["p_g"].clone().float(), state["alpha"].clone().float()

    def diagnostics(self, max_gamma: int = 4) -> dict:
        """What the last aggregation decided, as JSON-ready lists (clients named by partition id); a layer whose
        experts did not travel has ``"aligned": "not applied"`` instead of sets that would read as decisions."""
        if self.last is None:
            return {}
        r, ids = self.last, self.last_partition_ids
        aligned = [[[ids[c] for c in range(len(ids)) if r.aligned_LEC[l, e, c]] for e in range(r.aligned_LEC.shape[1])]
                   if r.experts_applied_L[l] else NOT_APPLIED for l in range(r.aligned_LEC.shape[0])]
        routed = [[[ids[c] for c in range(len(ids)) if self.last_routed_LEC[l, e, c]] for e in range(r.aligned_LEC.shape[1])]
                  for l in range(r.aligned_LEC.shape[0])]
        gamma = {f"layer{l}-expert{e}": g.tolist() for (l, e), g in list(r.gamma.items())[:max_gamma]}
        return {"clients": ids, "omega": r.omega_LCE.tolist(), "p_g": r.p_g_LE.tolist(), "alpha": r.alpha_LE.tolist(),
                "tau": [[None if t != t else t for t in row] for row in r.tau_LE.tolist()], "aligned": aligned,
                "routed": routed, "gamma": gamma}
