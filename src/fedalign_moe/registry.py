"""Every strategy a run can name, in one table: its kind, where it is built, the config options it reads,
its revision, and (by its place in ``REGISTRY``) its place in every table.

Config validation, the CLI, ``compare``, the reports and the memory plan all read this table; adding a
strategy means writing its class (a ``from_config`` classmethod, see ``federation/strategies.py``) and one
line here. The table sits at the bottom of the package: it imports nothing of it, and names each factory
as ``"module:attribute"`` under ``fedalign_moe``, which only the layer that builds strategies resolves
(``federation.strategies.load_factory``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal


@dataclass(frozen=True)
class StrategySpec:
    """One strategy a run can name.

    name : what ``federation.strategy`` and ``compare --strategies`` say.
    kind : "federated" (built by ``factory`` as a Flower strategy and run by the server loop) or "reference"
        (the floor and the ceiling of a table: ``factory`` is a runner over a workspace; nothing travels).
    factory : ``"module:attribute"`` under ``fedalign_moe``: a strategy class with ``from_config`` (federated)
        or a runner ``(workspace, log, on_round) -> summary`` (reference).
    reads : the strategy-specific options it reads (``"section.field"``, or ``"section"`` for a whole section);
        every option some strategy reads is left out of the others' result keys, so that a new default of
        one strategy's option keeps every other strategy's finished runs.
    fixed : FedAlign-MoE options this strategy fixes (an ablation rung's switches).
    revision : bumped when the strategy's code changes what its runs measure; ``compare`` runs a finished
        cell of an older revision again, and no table averages two revisions.
    summary : one line for help texts.
    """

    name: str
    kind: Literal["federated", "reference"]
    factory: str
    summary: str
    reads: tuple[str, ...] = ()
    fixed: dict[str, Any] = field(default_factory=dict)
    revision: int = 1

    @property
    def federated(self) -> bool:
        return self.kind == "federated"


_SERVER_OPT = ("federation.server_lr",)
_BYZANTINE = ("federation.num_malicious",)
_RUNG_OFF = dict(gate_regulariser=True, adaptive_alpha=False, expert_aggregation="fedavg")

# In table order: the floor and the ceiling first, the baselines, then FedAlign-MoE's ablation ladder upwards
# (paper, Table "ablation": each rung adds one component).
REGISTRY: tuple[StrategySpec, ...] = (
    StrategySpec("centralised", "reference", "training.standalone:run_centralised",
                 "one model on the union of all clients' data (the ceiling)"),
    StrategySpec("local", "reference", "training.standalone:run_local",
                 "each client trains alone, nothing exchanged (the floor)"),
    StrategySpec("fedavg", "federated", "federation.strategies:FedAvg", "FedAvg (McMahan et al. 2017)"),
    StrategySpec("fedprox", "federated", "federation.strategies:FedProx", "FedProx (Li et al. 2020)",
                 reads=("train.proximal_mu",)),
    StrategySpec("fedavgm", "federated", "federation.strategies:FedAvgM", "FedAvgM, server momentum (Hsu et al. 2019)",
                 reads=(*_SERVER_OPT, "federation.server_momentum")),
    StrategySpec("fedadagrad", "federated", "federation.strategies:FedAdagrad", "FedAdagrad (Reddi et al. 2021)",
                 reads=(*_SERVER_OPT, "federation.server_tau")),
    StrategySpec("fedadam", "federated", "federation.strategies:FedAdam", "FedAdam (Reddi et al. 2021)",
                 reads=(*_SERVER_OPT, "federation.server_tau", "federation.server_beta_1", "federation.server_beta_2")),
    StrategySpec("fedyogi", "federated", "federation.strategies:FedYogi", "FedYogi (Reddi et al. 2021)",
                 reads=(*_SERVER_OPT, "federation.server_tau", "federation.server_beta_1", "federation.server_beta_2")),
    StrategySpec("fedmoe", "federated", "federation.fedmoe:FedMoE", "FedMoE: each client trains and uploads its sub-MoE",
                 reads=("federation.fedmoe_coverage",), revision=2),  # 2: clients upload their sub-MoE only
    StrategySpec("fedtrimmedavg", "federated", "federation.strategies:FedTrimmedAvg", "coordinate-wise trimmed mean",
                 reads=("federation.trim_beta",)),
    StrategySpec("fedmedian", "federated", "federation.strategies:FedMedian", "coordinate-wise median"),
    StrategySpec("krum", "federated", "federation.strategies:Krum", "Krum (Blanchard et al. 2017)", reads=_BYZANTINE),
    StrategySpec("multikrum", "federated", "federation.strategies:MultiKrum", "Multi-Krum (Blanchard et al. 2017)",
                 reads=_BYZANTINE),
    StrategySpec("bulyan", "federated", "federation.strategies:Bulyan", "Bulyan (El Mhamdi et al. 2018)",
                 reads=_BYZANTINE),
    StrategySpec("fedalign-uniform", "federated", "federation.fedalign:FedAlignMoE",
                 "ablation: uniform router average + routing regulariser", reads=("fedalign",),
                 fixed=dict(gate_aggregation="uniform", **_RUNG_OFF)),
    StrategySpec("fedalign-consistency", "federated", "federation.fedalign:FedAlignMoE",
                 "ablation: + consistency-weighted router aggregation", reads=("fedalign",),
                 fixed=dict(gate_aggregation="consistency", **_RUNG_OFF)),
    StrategySpec("fedalign-adaptive", "federated", "federation.fedalign:FedAlignMoE",
                 "ablation: + adaptive regulariser strength", reads=("fedalign",),
                 fixed=dict(_RUNG_OFF, gate_aggregation="consistency", adaptive_alpha=True)),
    StrategySpec("fedalign", "federated", "federation.fedalign:FedAlignMoE",
                 "FedAlign-MoE: + semantic-aware expert aggregation (the full method)", reads=("fedalign",)),
)
SPECS: dict[str, StrategySpec] = {spec.name: spec for spec in REGISTRY}
STRATEGIES: tuple[str, ...] = tuple(SPECS)
FEDERATED: tuple[str, ...] = tuple(spec.name for spec in REGISTRY if spec.federated)
REFERENCE: tuple[str, ...] = tuple(spec.name for spec in REGISTRY if not spec.federated)
# every option some strategy reads (the others' result keys leave it out)
STRATEGY_OPTIONS: tuple[str, ...] = tuple(dict.fromkeys(option for spec in REGISTRY for option in spec.reads))


def spec(name: str) -> StrategySpec:
    """The registry's entry for ``name``; ``KeyError`` names the known strategies."""
    try:
        return SPECS[name]
    except KeyError:
        raise KeyError(f"unknown strategy {name!r}; choose one of {', '.join(STRATEGIES)}") from None


def table_position(name: str) -> int:
    """Where ``name`` sits in a table (unknown names last)."""
    return STRATEGIES.index(name) if name in SPECS else len(STRATEGIES)
