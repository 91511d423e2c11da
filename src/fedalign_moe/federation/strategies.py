"""Which Flower strategy a run uses. FedAvg and FedProx are Flower's own aggregation behind this
package's reply screen (``screening.ScreenedReplies``); FedAlign-MoE and its ablation rungs are
``fedalign.FedAlignMoE``; the FedMoE baseline is ``fedmoe.FedMoE``."""

from __future__ import annotations

from flwr.serverapp import strategy as flwr_strategy

from ..config import FEDALIGN_RUNGS, Config
from ..models.base import MoELayout
from . import protocol
from .protocol import LocalWork
from .fedalign import FedAlignMoE
from .fedmoe import FedMoE
from .node_policy import FILE_SOURCES
from .screening import ReplyPolicy, ScreenedReplies

FEDERATED = ("fedavg", "fedprox", "fedmoe", *FEDALIGN_RUNGS)


class FedAvg(ScreenedReplies, flwr_strategy.FedAvg):
    """FedAvg (McMahan et al. 2017, arXiv 1602.05629): Flower's example-weighted average of valid replies."""


class FedProx(ScreenedReplies, flwr_strategy.FedProx):
    """FedProx (Li et al. 2020, arXiv 1812.06127): FedAvg's aggregation; clients add (mu/2)||w - w_g||^2."""


def checks_example_counts(cfg: Config) -> bool:
    """Whether a reply's example count must equal its partition's size (``federation.example_counts``)."""
    mode = cfg.federation.example_counts
    return mode == "checked" or (mode == "auto" and cfg.data.source not in FILE_SOURCES)


def reply_policy(cfg: Config, layout: MoELayout, partition_sizes: tuple[int, ...] | None = None) -> ReplyPolicy:
    fed = cfg.federation
    return ReplyPolicy(layout, cfg.partition.num_clients, LocalWork.of_config(cfg), fed.max_update_norm_ratio, fed.round_timeout,
                       fed.max_examples_ratio, fed.max_weight_share, partition_sizes if checks_example_counts(cfg) else None)


def make_strategy(cfg: Config, layout: MoELayout, partition_sizes: tuple[int, ...] | None = None) -> ScreenedReplies:
    """The strategy object for ``cfg.federation.strategy`` (a federated one). ``partition_sizes``: each
    partition's training examples, which replies' claims are checked against when the config says so.

    Flower's own node sampling would wait for ``min_available_nodes`` forever; the server loop waits
    instead, with a time limit (``federation.node_wait_seconds``), so the strategy asks for one node.
    """
    common = dict(
        fraction_train=cfg.federation.fraction_train,
        fraction_evaluate=1.0,
        min_train_nodes=1,
        min_evaluate_nodes=1,
        min_available_nodes=1,
        weighted_by_key=protocol.NUM_EXAMPLES,
        arrayrecord_key=protocol.ARRAYS,
        configrecord_key=protocol.CONFIG,
    )
    policy = reply_policy(cfg, layout, partition_sizes)
    name = cfg.federation.strategy
    if name == "fedavg":
        return FedAvg(policy, **common)
    if name == "fedprox":
        return FedProx(policy, **common, proximal_mu=cfg.train.proximal_mu)
    if name == "fedmoe":
        return FedMoE(policy, cfg.federation.fedmoe_coverage, **common)
    if name in FEDALIGN_RUNGS:
        return FedAlignMoE(policy, cfg.effective_fedalign(), **common)
    raise ValueError(f"{name!r} is not a federated strategy; federated ones: {', '.join(FEDERATED)}")
