"""The strategy registry: every entry builds, and the config, the tables and the plan follow it."""

from __future__ import annotations

import pytest

from fedalign_moe.config import load_config
from fedalign_moe.federation.screening import ScreenedReplies
from fedalign_moe.federation.strategies import load_factory, make_strategy
from fedalign_moe.registry import FEDERATED, REGISTRY, STRATEGIES, STRATEGY_OPTIONS, spec, table_position
from fedalign_moe.report.tables import cell_order
from replies import LAYOUT


@pytest.mark.parametrize("entry", REGISTRY, ids=lambda s: s.name)
def test_every_entry_builds_what_its_kind_says(entry):
    if entry.federated:
        cfg = load_config("tiny", overrides={"federation": {"strategy": entry.name}})
        strategy = make_strategy(cfg, LAYOUT)
        assert isinstance(strategy, ScreenedReplies)
        assert isinstance(strategy, load_factory(entry))
    else:
        assert callable(load_factory(entry))
        with pytest.raises(ValueError, match="not a federated strategy"):
            make_strategy(load_config("tiny", overrides={"federation": {"strategy": entry.name}}), LAYOUT)


def test_a_strategy_reads_its_own_options_into_flower():
    cfg = load_config("tiny", overrides={"federation": {"strategy": "fedadam", "server_lr": 0.05, "server_tau": 0.2,
                                                        "server_beta_1": 0.5}})
    adam = make_strategy(cfg, LAYOUT)
    assert (adam.eta, adam.tau, adam.beta_1) == (0.05, 0.2, 0.5)
    adagrad = make_strategy(cfg.model_copy(update={"federation": cfg.federation.model_copy(update={"strategy": "fedadagrad"})}), LAYOUT)
    assert (type(adagrad).__name__, adagrad.eta, adagrad.tau) == ("FedAdagrad", 0.05, 0.2)


@pytest.mark.parametrize("name", STRATEGIES)
def test_a_result_key_keeps_exactly_the_options_its_strategy_reads(name):
    key = load_config("tiny", overrides={"federation": {"strategy": name}}).result_key()
    for option in STRATEGY_OPTIONS:
        section, _, field = option.partition(".")
        present = (field in key.get(section, {})) if field else (section in key)
        assert present == (option in spec(name).reads), option
    assert ("wire_dtype" in key["federation"]) == (name in FEDERATED)


def test_tables_follow_the_registry_order():
    cells = [(0.1, "fedalign"), (1.0, "fedprox"), (0.1, "centralised"), (0.1, "fedavg"), (0.1, "someday")]
    assert sorted(cells, key=cell_order) == [(1.0, "fedprox"), (0.1, "centralised"), (0.1, "fedavg"), (0.1, "fedalign"),
                                             (0.1, "someday")]
    assert table_position("centralised") == 0 and table_position("someday") == len(STRATEGIES)


def test_an_unknown_name_is_one_line_naming_the_choices():
    with pytest.raises(KeyError, match="unknown strategy 'fedfoo'; choose one of centralised, local, fedavg"):
        spec("fedfoo")
