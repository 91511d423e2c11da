"""Which Flower strategy a run uses. FedAvg and FedProx are Flower's FedAvg arithmetic behind this
package's reply screen (``screening.ScreenedReplies``), over the screen's bounded example weights; the
robust baselines (trimmed mean, median, Krum, Multi-Krum, Bulyan) are Flower's own strategies behind the
same screen; FedAlign-MoE and its ablation rungs are ``fedalign.FedAlignMoE``; the FedMoE baseline is
``fedmoe.FedMoE``."""

from __future__ import annotations

import math

from flwr.app import ArrayRecord, Message
from flwr.serverapp import strategy as flwr_strategy

from ..config import FEDALIGN_RUNGS, ROBUST_BASELINES, Config
from ..models.base import MoELayout
from . import protocol
from .protocol import LocalWork
from .fedalign import FedAlignMoE
from .fedmoe import FedMoE
from .node_policy import FILE_SOURCES
from .screening import ReplyPolicy, ScreenedReplies

FEDERATED = ("fedavg", "fedprox", "fedmoe", *ROBUST_BASELINES, *FEDALIGN_RUNGS)


class FedAvg(ScreenedReplies, flwr_strategy.FedAvg):
    """FedAvg (McMahan et al. 2017, arXiv 1602.05629): Flower's example-weighted average of valid replies."""


class FedProx(ScreenedReplies, flwr_strategy.FedProx):
    """FedProx (Li et al. 2020, arXiv 1812.06127): FedAvg's aggregation; clients add (mu/2)||w - w_g||^2."""


class FlowerRobustAggregation:
    """Mixin (first in the bases): the screened replies go to the Flower parent's own ``aggregate_train``,
    each as a copy that carries its bounded weight (Flower's robust rules pop arrays out of what they read)."""

    def aggregate_replies(self, server_round, replies):
        copies = [Message(content=r.weighted_content(), reply_to=r.message) for r in replies]
        for msg in copies:
            msg.content[protocol.ARRAYS] = ArrayRecord(dict(msg.content[protocol.ARRAYS].items()))
        return super(ScreenedReplies, self).aggregate_train(server_round, copies)


class FedTrimmedAvg(FlowerRobustAggregation, ScreenedReplies, flwr_strategy.FedTrimmedAvg):
    """Coordinate-wise trimmed mean (Yin et al. 2018, arXiv 1803.01498): Flower's, behind the reply screen."""


class FedMedian(FlowerRobustAggregation, ScreenedReplies, flwr_strategy.FedMedian):
    """Coordinate-wise median (Yin et al. 2018, arXiv 1803.01498): Flower's, behind the reply screen."""


class Krum(FlowerRobustAggregation, ScreenedReplies, flwr_strategy.Krum):
    """Krum (Blanchard et al. 2017, NeurIPS): the update closest to its n - f - 2 neighbours; Flower's."""


class MultiKrum(FlowerRobustAggregation, ScreenedReplies, flwr_strategy.MultiKrum):
    """Multi-Krum (Blanchard et al. 2017): the average of the m updates Krum ranks best; Flower's."""


class Bulyan(FlowerRobustAggregation, ScreenedReplies, flwr_strategy.Bulyan):
    """Bulyan (El Mhamdi et al. 2018, arXiv 1802.07927): Krum selection, then a trimmed mean; Flower's."""


def checks_example_counts(cfg: Config) -> bool:
    """Whether a reply's example count must equal its partition's size (``federation.example_counts``)."""
    mode = cfg.federation.example_counts
    return mode == "checked" or (mode == "auto" and cfg.data.source not in FILE_SOURCES)


def reply_policy(cfg: Config, layout: MoELayout, partition_sizes: tuple[int, ...] | None = None) -> ReplyPolicy:
    fed = cfg.federation
    return ReplyPolicy(layout, cfg.partition.num_clients, LocalWork.of_config(cfg), fed.max_update_norm_ratio, fed.round_timeout,
                       fed.max_examples_ratio, fed.max_weight_share, partition_sizes if checks_example_counts(cfg) else None,
                       fed.wire_dtype)


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
    f = cfg.federation.num_malicious
    if name == "fedtrimmedavg":
        return FedTrimmedAvg(policy, **common, beta=cfg.federation.trim_beta)
    if name == "fedmedian":
        return FedMedian(policy, **common)
    if name == "krum":
        return Krum(policy, **common, num_malicious_nodes=f)
    if name == "multikrum":  # averages the n - f updates Krum ranks best, n: the nodes a round samples
        sampled = max(1, math.ceil(cfg.federation.fraction_train * cfg.partition.num_clients))
        return MultiKrum(policy, **common, num_malicious_nodes=f, num_nodes_to_select=max(1, sampled - f))
    if name == "bulyan":
        return Bulyan(policy, **common, num_malicious_nodes=f)
    if name in FEDALIGN_RUNGS:
        return FedAlignMoE(policy, cfg.effective_fedalign(), **common)
    raise ValueError(f"{name!r} is not a federated strategy; federated ones: {', '.join(FEDERATED)}")
