"""Flower's server optimisers behind the reply screen: FedAvgM and FedAdam against steps computed by hand,
their moments kept as the strategy's state (a resumed strategy takes the same next step), and a step that
always starts from the global model the round sent."""

import math

import pytest
import torch

import replies

SIZES = [10, 30, 60]


def _round(s, glob, trained, server_round=1):
    sent = replies.instructions(s, glob, len(trained), server_round)
    arrays, _ = s.aggregate_train(server_round, [replies.reply(m, i, u, n) for i, (m, u, n)
                                                 in enumerate(zip(sent, trained, SIZES))])
    return arrays.to_torch_state_dict()


def _average(trained):
    return {k: sum(n * t[k] for n, t in zip(SIZES, trained)) / sum(SIZES) for k in trained[0]}


def test_fedavgm_steps_along_the_average_with_momentum(server_identity):
    s = replies.strategy("fedavgm", 3, server_lr=0.5, server_momentum=0.8)
    g0 = replies.global_state()
    first = [replies.perturbed(g0, seed, 0.1) for seed in range(3)]
    g1 = _round(s, g0, first)
    m1 = {k: g0[k] - _average(first)[k] for k in g0}  # the pseudo-gradient starts the momentum
    for k in g0:
        assert torch.allclose(g1[k], g0[k] - 0.5 * m1[k], atol=1e-6)
    second = [replies.perturbed(g1, 10 + seed, 0.1) for seed in range(3)]
    g2 = _round(s, g1, second, 2)
    for k in g0:
        m2 = 0.8 * m1[k] + (g1[k] - _average(second)[k])
        assert torch.allclose(g2[k], g1[k] - 0.5 * m2, atol=1e-5)


def test_fedadam_takes_a_bias_corrected_adam_step(server_identity):
    s = replies.strategy("fedadam", 3, server_lr=0.01, server_beta_1=0.9, server_beta_2=0.99, server_tau=1e-3)
    g0 = replies.global_state()
    trained = [replies.perturbed(g0, seed, 0.01) for seed in range(3)]
    g1 = _round(s, g0, trained)
    eta = 0.01 * math.sqrt(1 - 0.99 ** 2) / (1 - 0.9 ** 2)  # Flower's correction at server round 1
    for k in g0:
        delta = _average(trained)[k] - g0[k]
        m, v = 0.1 * delta, 0.01 * delta ** 2
        assert torch.allclose(g1[k], g0[k] + eta * m / (v.sqrt() + 1e-3), atol=1e-6)


@pytest.mark.parametrize("name", ["fedavgm", "fedadagrad", "fedadam", "fedyogi"])
def test_the_step_keeps_the_models_dtype(name, server_identity):
    """Flower's FedAdam widened the model to float64 (a NumPy 2 float64 scalar): every next reply, float32, was
    then refused as the wrong dtype."""
    g0 = replies.global_state()
    g1 = _round(replies.strategy(name, 3), g0, [replies.perturbed(g0, seed, 0.01) for seed in range(3)])
    assert {t.dtype for t in g1.values()} == {torch.float32}


@pytest.mark.parametrize("name", ["fedavgm", "fedadagrad", "fedadam", "fedyogi"])
def test_a_resumed_server_optimiser_takes_the_same_next_step(name, server_identity):
    """The moments travel in ``state_dict`` (what a checkpoint keeps) and come back by name: FedAvgM's,
    which Flower keeps as a list in the arrays' order, too, whatever order the checkpoint lists them in."""
    g0 = replies.global_state()
    first = [replies.perturbed(g0, seed, 0.05) for seed in range(3)]
    going = replies.strategy(name, 3)
    g1 = _round(going, g0, first)
    state = going.state_dict()
    assert state and all(t.dtype == torch.float32 for t in state.values())
    resumed = replies.strategy(name, 3)
    resumed.load_state_dict(dict(reversed(list(state.items()))))
    second = [replies.perturbed(g1, 10 + seed, 0.05) for seed in range(3)]
    a, b = _round(going, g1, second, 2), _round(resumed, g1, second, 2)
    assert all(torch.equal(a[k], b[k]) for k in a)
    fresh = _round(replies.strategy(name, 3), g1, second, 2)
    assert any(not torch.equal(a[k], fresh[k]) for k in a)  # the moments matter: a fresh one steps elsewhere


def test_the_step_starts_from_the_model_the_round_sent(server_identity):
    """FedAvgM in Flower keeps its own idea of the current model (its last aggregate); after an aggregate the
    server did not adopt, the next step must start from the global model the server sent, not from it."""
    s = replies.strategy("fedavgm", 3, server_lr=1.0, server_momentum=0.0)
    g0 = replies.global_state()
    _round(s, g0, [replies.perturbed(g0, seed, 1.0) for seed in range(3)])  # imagine it was not adopted
    trained = [replies.perturbed(g0, 10 + seed, 0.1) for seed in range(3)]
    again = _round(s, g0, trained)  # the server sends g0 again
    for k in g0:
        assert torch.allclose(again[k], _average(trained)[k], atol=1e-6)  # lr 1, no momentum: FedAvg's answer


def test_unset_server_lr_is_each_optimisers_own_default():
    from fedalign_moe.config import load_config

    lr = {name: load_config("tiny", overrides={"federation": {"strategy": name}}).federation.effective_server_lr()
          for name in ("fedavgm", "fedadam")}
    assert lr == {"fedavgm": 1.0, "fedadam": 1e-3}
    fedavg = load_config("tiny", overrides={"federation": {"strategy": "fedavg", "server_lr": 0.5}})
    assert "server_lr" not in fedavg.result_key()["federation"]  # FedAvg never reads it


@pytest.mark.parametrize("name", ["fedavgm", "fedadam"])
def test_three_rounds_through_the_server_loop_and_clients(name, tmp_path, monkeypatch):
    """The real ServerApp loop and ClientApp (in this process): every round's replies are used, every
    aggregate adopted (Flower's float64 FedAdam aggregate had every later reply refused)."""
    import json

    from fedalign_moe.config import load_config
    from fedalign_moe.federation.client_app import cached_workspace
    from in_process import run_in_process

    cached_workspace.cache_clear()
    cfg = load_config("tiny", overrides={"out_dir": str(tmp_path), "federation": {"strategy": name, "rounds": 3},
                                         "data": {"max_train": 90, "max_test": 30}})
    summary = run_in_process(cfg, monkeypatch)
    cached_workspace.cache_clear()
    assert summary["rounds_not_adopted"] == [] and summary["failures_total"] == 0
    rounds = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["replied"] for r in rounds] == [3, 3, 3]
