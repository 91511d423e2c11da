"""Which Flower strategy a run uses. FedAvg and FedProx are Flower's own (``flwr.serverapp.strategy``)."""

from __future__ import annotations

from flwr.serverapp.strategy import FedAvg, FedProx, Strategy

from ..config import Config
from . import keys

FEDERATED = ("fedavg", "fedprox")


def make_strategy(cfg: Config) -> Strategy:
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
    raise ValueError(f"{name!r} is not a federated strategy; federated ones: {', '.join(FEDERATED)}")
