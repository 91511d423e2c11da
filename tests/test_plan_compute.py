"""The plan's compute estimate: tokens and FLOPs of a run, and hours on one H100 (known answers)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from fedalign_moe.config import load_config
from fedalign_moe.training.plan import H100_FLOPS_PER_SECOND, estimate_compute

DATA = SimpleNamespace(client_train=[range(30), range(10)], client_test=[range(5), range(5)], global_test=range(20))


def facts(active: int = 100, trainable: int = 10, rows: int = 1) -> SimpleNamespace:
    return SimpleNamespace(active_parameters=active, trainable_parameters=trainable, rows_per_example=rows)


def cfg(**over):
    return load_config("tiny", overrides={"data": {"max_length": 8}, "federation": {"rounds": 3, "fraction_train": 1.0},
                                          "partition": {"num_clients": 2}, **over})


def test_tokens_and_flops_of_a_federated_run():
    est = estimate_compute(cfg(), facts(), DATA)
    assert est.train_tokens == 3 * 40 * 8  # rounds x every client's examples x tokens a sequence
    assert est.eval_tokens == (3 * (10 + 20) + 10) * 8  # own tests and the global test each round, own tests at the end
    assert est.flops == est.train_tokens * (4 * 100 + 2 * 10) + est.eval_tokens * 2 * 100
    fast, slow = est.gpu_hours()
    assert fast == pytest.approx(est.flops / max(H100_FLOPS_PER_SECOND) / 3600) and slow > fast


def test_everything_trains_at_six_flops_a_parameter_and_choices_count_their_rows():
    est = estimate_compute(cfg(), facts(active=100, trainable=1000, rows=4), DATA)
    assert est.train_tokens == 3 * 40 * 8 * 4 and est.flops == est.train_tokens * 600 + est.eval_tokens * 200


def test_local_steps_and_the_local_baseline():
    steps = estimate_compute(cfg(train={"local_steps": 2, "batch_size": 4}), facts(), DATA)
    assert steps.train_tokens == 3 * 2 * 2 * 4 * 8  # rounds x clients x steps x batch x tokens
    local = estimate_compute(cfg(federation={"rounds": 3, "fraction_train": 0.5, "strategy": "local"}), facts(), DATA)
    assert local.train_tokens == 3 * 40 * 8  # every client trains, whatever fraction_train says
    assert local.eval_tokens == 3 * (10 + 2 * 20) * 8  # own tests, and each client's model on the global test split


def test_a_sampled_round_is_bounded_by_its_largest_partitions():
    half = estimate_compute(cfg(federation={"rounds": 3, "fraction_train": 0.5}), facts(), DATA)
    assert half.train_tokens == 3 * 30 * 8  # one client of two a round: the larger partition
    assert half.eval_tokens == (3 * (5 + 20) + 10) * 8
