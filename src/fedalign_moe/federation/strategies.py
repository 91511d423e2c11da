"""Which Flower strategy a run uses. FedAvg and FedProx are Flower's FedAvg arithmetic behind this
package's reply screen (``screening.ScreenedReplies``), over the screen's bounded example weights; the
server optimisers (FedAvgM, FedAdagrad, FedAdam, FedYogi) and the robust baselines (trimmed mean, median,
Krum, Multi-Krum, Bulyan) are Flower's own strategies behind the same screen; FedAlign-MoE and its ablation
rungs are ``fedalign.FedAlignMoE``; the FedMoE baseline is ``fedmoe.FedMoE``. Which name builds which class:
``registry.REGISTRY``; each class reads its own options from the run's config (``from_config``)."""

from __future__ import annotations

import importlib
import math
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, Message
from flwr.serverapp import strategy as flwr_strategy

from ..config import Config
from ..models.base import MoELayout
from ..registry import FEDERATED, StrategySpec, spec
from . import protocol
from .node_policy import FILE_SOURCES
from .protocol import LocalWork
from .screening import ReplyPolicy, ScreenedReplies


class FedAvg(ScreenedReplies, flwr_strategy.FedAvg):
    """FedAvg (McMahan et al. 2017, arXiv 1602.05629): Flower's example-weighted average of valid replies."""


class FedProx(ScreenedReplies, flwr_strategy.FedProx):
    """FedProx (Li et al. 2020, arXiv 1812.06127): FedAvg's aggregation; clients add (mu/2)||w - w_g||^2."""

    @classmethod
    def from_config(cls, cfg, policy, **flower_kwargs):
        return cls(policy, **flower_kwargs, proximal_mu=cfg.train.proximal_mu)


class FlowerAggregation:
    """Mixin (first in the bases): the screened replies go to the Flower parent's own ``aggregate_train``,
    each as a copy that carries its bounded weight (Flower's robust rules pop arrays out of what they read)."""

    def aggregate_replies(self, server_round, replies):
        copies = [Message(content=r.weighted_content(), reply_to=r.message) for r in replies]
        for msg in copies:
            msg.content[protocol.ARRAYS] = ArrayRecord(dict(msg.content[protocol.ARRAYS].items()))
        return super(ScreenedReplies, self).aggregate_train(server_round, copies)


class ServerOptimizer(FlowerAggregation):
    """Mixin for Flower's server optimisers: Flower's own step on the screened replies' average, from the
    global model the round sent (set every round, so that an aggregate the server did not adopt, or a
    resumed run, never leaves the optimiser stepping from another model), with its moments as the
    strategy's state (``state_dict``: what a checkpoint keeps, and what the round loop restores when it
    does not adopt an aggregate)."""

    MOMENTS: tuple[str, ...] = ()  # attributes holding the optimiser's moments: name -> ndarray, or a list
    BETAS = True  # Adam and Yogi read beta_1 and beta_2; Adagrad has none

    @classmethod
    def from_config(cls, cfg, policy, **flower_kwargs):
        """The adaptive optimisers (FedAvgM overrides): step ``eta``, client rate ``eta_l``, ``tau``, betas."""
        fed = cfg.federation
        betas = {"beta_1": fed.server_beta_1, "beta_2": fed.server_beta_2} if cls.BETAS else {}
        return cls(policy, **flower_kwargs, eta=fed.effective_server_lr(), eta_l=cfg.train.lr, tau=fed.server_tau, **betas)

    def configure_train(self, server_round, arrays, config, grid):
        if isinstance(self, flwr_strategy.FedAvgM):
            self.current_arrays = ArrayRecord(dict(arrays.items()))
            if isinstance(self.momentum_vector, dict):  # loaded by name: Flower keeps it in the arrays' order
                self.momentum_vector = [self.momentum_vector[k] for k in arrays.keys()]
        else:
            self.current_arrays = {k: a.numpy() for k, a in arrays.items()}
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_replies(self, server_round, replies):
        """Flower's step, in the global model's own dtypes: Flower's FedAdam multiplies by a float64 NumPy
        scalar, which NumPy 2 widens the whole model to (the next round's float32 replies would then all be
        refused as the wrong dtype)."""
        arrays, metrics = super().aggregate_replies(server_round, replies)
        if arrays is None:
            return arrays, metrics
        dtypes = {k: t.dtype for k, t in self.global_state.items()}
        return ArrayRecord({k: t.to(dtypes.get(k, t.dtype)) for k, t in arrays.to_torch_state_dict().items()}), metrics

    def state_dict(self) -> dict[str, torch.Tensor]:
        names = list(self.global_state)  # the order Flower keeps FedAvgM's momentum in
        state = {}
        for moment in self.MOMENTS:
            value = getattr(self, moment)
            if value:
                items = value.items() if isinstance(value, dict) else zip(names, value, strict=True)
                state.update({f"{moment}/{k}": torch.from_numpy(np.array(v, copy=True)) for k, v in items})
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for moment in self.MOMENTS:  # by name; FedAvgM's as a list in the arrays' order once that is known
            kept = {k.split("/", 1)[1]: t.numpy().copy() for k, t in state.items() if k.startswith(f"{moment}/")}
            if kept and moment == "momentum_vector" and set(kept) == set(self.global_state):
                kept = [kept[k] for k in self.global_state]
            setattr(self, moment, kept or None)
        unknown = sorted(k for k in state if k.split("/", 1)[0] not in self.MOMENTS)
        if unknown:
            raise ValueError(f"{type(self).__name__} keeps {list(self.MOMENTS)}, got {unknown[:3]}")


class FedAvgM(ServerOptimizer, ScreenedReplies, flwr_strategy.FedAvgM):
    """FedAvgM (Hsu et al. 2019, arXiv 1909.06335): server SGD with momentum on the average update; Flower's."""

    MOMENTS = ("momentum_vector",)

    @classmethod
    def from_config(cls, cfg, policy, **flower_kwargs):
        fed = cfg.federation
        return cls(policy, **flower_kwargs, server_learning_rate=fed.effective_server_lr(), server_momentum=fed.server_momentum)


class FedAdagrad(ServerOptimizer, ScreenedReplies, flwr_strategy.FedAdagrad):
    """FedAdagrad (Reddi et al. 2021, arXiv 2003.00295): server Adagrad on the average update; Flower's."""

    MOMENTS = ("m_t", "v_t")
    BETAS = False


class FedAdam(ServerOptimizer, ScreenedReplies, flwr_strategy.FedAdam):
    """FedAdam (Reddi et al. 2021, arXiv 2003.00295): server Adam on the average update; Flower's."""

    MOMENTS = ("m_t", "v_t")


class FedYogi(ServerOptimizer, ScreenedReplies, flwr_strategy.FedYogi):
    """FedYogi (Reddi et al. 2021, arXiv 2003.00295): server Yogi on the average update; Flower's."""

    MOMENTS = ("m_t", "v_t")


class FedTrimmedAvg(FlowerAggregation, ScreenedReplies, flwr_strategy.FedTrimmedAvg):
    """Coordinate-wise trimmed mean (Yin et al. 2018, arXiv 1803.01498): Flower's, behind the reply screen."""

    @classmethod
    def from_config(cls, cfg, policy, **flower_kwargs):
        return cls(policy, **flower_kwargs, beta=cfg.federation.trim_beta)


class Byzantine:
    """Mixin for the rules told how many clients may be hostile (``federation.num_malicious``)."""

    @classmethod
    def from_config(cls, cfg, policy, **flower_kwargs):
        return cls(policy, **flower_kwargs, num_malicious_nodes=cfg.federation.num_malicious)


class FedMedian(FlowerAggregation, ScreenedReplies, flwr_strategy.FedMedian):
    """Coordinate-wise median (Yin et al. 2018, arXiv 1803.01498): Flower's, behind the reply screen."""


class Krum(Byzantine, FlowerAggregation, ScreenedReplies, flwr_strategy.Krum):
    """Krum (Blanchard et al. 2017, NeurIPS): the update closest to its n - f - 2 neighbours; Flower's."""


class MultiKrum(FlowerAggregation, ScreenedReplies, flwr_strategy.MultiKrum):
    """Multi-Krum (Blanchard et al. 2017): the average of the m updates Krum ranks best; Flower's."""

    @classmethod
    def from_config(cls, cfg, policy, **flower_kwargs):
        """It averages the n - f updates Krum ranks best, n: the nodes a round samples."""
        f = cfg.federation.num_malicious
        sampled = max(1, math.ceil(cfg.federation.fraction_train * cfg.partition.num_clients))
        return cls(policy, **flower_kwargs, num_malicious_nodes=f, num_nodes_to_select=max(1, sampled - f))


class Bulyan(Byzantine, FlowerAggregation, ScreenedReplies, flwr_strategy.Bulyan):
    """Bulyan (El Mhamdi et al. 2018, arXiv 1802.07927): Krum selection, then a trimmed mean; Flower's."""


def load_factory(strategy: StrategySpec) -> Any:
    """The class (federated) or runner (reference) a registry entry names."""
    module, attribute = strategy.factory.split(":")
    return getattr(importlib.import_module(f"fedalign_moe.{module}"), attribute)


def checks_example_counts(cfg: Config) -> bool:
    """Whether a reply's example count must equal its partition's size (``federation.example_counts``)."""
    mode = cfg.federation.example_counts
    return mode == "checked" or (mode == "auto" and cfg.data.source not in FILE_SOURCES)


def reply_policy(cfg: Config, layout: MoELayout, partition_sizes: tuple[int, ...] | None = None,
                 rows_per_example: int = 1) -> ReplyPolicy:
    fed = cfg.federation
    return ReplyPolicy(layout, cfg.partition.num_clients, LocalWork.of_config(cfg, rows_per_example), fed.max_update_norm_ratio,
                       fed.round_timeout,
                       fed.max_examples_ratio, fed.max_weight_share, partition_sizes if checks_example_counts(cfg) else None,
                       fed.wire_dtype, fed.clip_update_norm_ratio)


def make_strategy(cfg: Config, layout: MoELayout, partition_sizes: tuple[int, ...] | None = None,
                  rows_per_example: int = 1) -> ScreenedReplies:
    """The strategy object for ``cfg.federation.strategy`` (a federated one), built by its registry entry's
    class (``registry.REGISTRY``). ``partition_sizes``: each
    partition's training examples, which replies' claims are checked against when the config says so;
    ``rows_per_example``: the sequences an example of the run's data is read as (its tokens are bounded by them).

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
    strategy = spec(cfg.federation.strategy)
    if not strategy.federated:
        raise ValueError(f"{strategy.name!r} is not a federated strategy; federated ones: {', '.join(FEDERATED)}")
    return load_factory(strategy).from_config(cfg, reply_policy(cfg, layout, partition_sizes, rows_per_example), **common)
