"""Which Flower strategy a run uses. FedAvg and FedProx are Flower's own (``flwr.serverapp.strategy``);
FedAlign-MoE and its ablation rungs are ``federation.fedalign.FedAlignMoE``."""

from __future__ import annotations

from flwr.serverapp.strategy import FedAvg, FedProx, Strategy

from ..config import FEDALIGN_RUNGS, Config
from ..models.base import MoELayout
from . import keys
from .fedalign import FedAlignMoE
from .fedmoe import FedMoE

FEDERATED = ("fedavg", "fedprox", "fedmoe", *FEDALIGN_RUNGS)


def make_strategy(cfg: Config, layout: MoELayout | None = None) -> Strategy:
    """The strategy object for ``cfg.federation.strategy`` (a federated one)."""
    n = cfg.partition.num_clients
    common = dict(
        fraction_train=cfg.federation.fraction_train,
        fraction_evaluate=1.0,
        min_train_nodes=max(1, int(n * cfg.federation.fraction_train)),
        min_evaluate_nodes=n,
        min_available_nodes=n,  # wait until every client is connected
        weighted_by_key=keys.NUM_EXAMPLES,
        arrayrecord_key=keys.ARRAYS,
        configrecord_key=keys.CONFIG,
    )
    name = cfg.federation.strategy
    if name == "fedavg":
        return FedAvg(**common)
    if name == "fedprox":
        return FedProx(**common, proximal_mu=cfg.train.proximal_mu)
    if layout is None:
        raise ValueError(f"{name} needs the model's MoE layout")
    if name == "fedmoe":
        return FedMoE(layout, cfg.federation.fedmoe_coverage, **common)
    if name in FEDALIGN_RUNGS:
        return FedAlignMoE(layout, cfg.effective_fedalign(), **common)
    raise ValueError(f"{name!r} is not a federated strategy; federated ones: {', '.join(FEDERATED)}")
