"""Strategies against hand-computed aggregates, and a real Flower simulation end to end."""

import json

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, Message, RecordDict

import replies
from fedalign_moe.config import load_config
from fedalign_moe.federation import protocol
from fedalign_moe.federation.server import client_rows, record_bytes
from fedalign_moe.federation.strategies import make_strategy


def _strategy(name: str, num_clients: int = 3, **over):
    cfg = load_config("tiny", overrides={"federation": {"strategy": name, **over}, "partition": {"num_clients": num_clients}})
    return make_strategy(cfg, replies.LAYOUT)


@pytest.mark.parametrize("strategy", ["fedavg", "fedprox"])
def test_aggregation_is_the_example_weighted_average(strategy, server_identity):
    glob = replies.global_state()
    s = _strategy(strategy)
    sent = replies.instructions(s, glob, 3)
    updates = [replies.perturbed(glob, seed) for seed in range(3)]
    sizes = [10, 30, 60]
    arrays, _ = s.aggregate_train(1, [replies.reply(m, i, u, n) for i, (m, u, n) in enumerate(zip(sent, updates, sizes))])
    got = arrays.to_torch_state_dict()
    for name in glob:
        # by hand: (10 w0 + 30 w1 + 60 w2) / 100
        expected = (10 * updates[0][name] + 30 * updates[1][name] + 60 * updates[2][name]) / 100
        assert torch.allclose(got[name], expected, atol=1e-6)


def test_fedmoe_clients_upload_their_sub_moe_only_and_the_server_aggregates_the_same(server_identity):
    from fedalign_moe.core.aggregate import LayerNames
    from fedalign_moe.core.fedmoe import fedmoe_aggregate

    glob = replies.global_state()
    strategy = _strategy("fedmoe")
    sent = replies.instructions(strategy, glob, 3)
    states = [replies.perturbed(glob, seed, 1.0) for seed in range(3)]
    counts = [[20.0, 20.0, 0.0, 0.0], [0.0, 2.0, 20.0, 18.0], [20.0, 18.0, 1.0, 1.0]]  # sub-MoEs at coverage 0.9,
    answers = [replies.reply(m, i, s, 10, replies.routing(n)) for i, (m, s, n) in enumerate(zip(sent, states, counts))]
    assert [tuple(a.content[protocol.ARRAYS]["x"].shape) for a in answers] == [(2, 2, 5)] * 3  # at least top-2:
    assert [a.content[protocol.METRICS][protocol.SUB_MOE] for a in answers] == [[1, 1, 0, 0], [0, 0, 1, 1], [1, 1, 0, 0]]
    full = RecordDict({"a": ArrayRecord(states[2])})
    assert record_bytes(answers[2].content, protocol.ARRAYS) < record_bytes(full)  # two of four experts stay home
    arrays, _ = strategy.aggregate_train(1, answers)
    held = torch.tensor([[[1, 1, 0, 0]], [[0, 0, 1, 1]], [[1, 1, 0, 0]]]).bool()
    expected, _ = fedmoe_aggregate(glob, states, torch.tensor([10.0] * 3), torch.tensor(counts).reshape(3, 1, 4),
                                   [LayerNames("r", ("x",))], 0.9, 2, held)
    got = arrays.to_torch_state_dict()
    for name in glob:  # the rows a client kept home had weight 0 anyway: the same aggregate, bit for bit
        assert torch.equal(got[name], expected[name].float())
    # an upload whose rows do not match its reported sub-MoE is dropped, not aggregated and not fatal
    answers[2].content[protocol.METRICS][protocol.SUB_MOE] = [1, 1, 1, 0]
    strategy.aggregate_train(1, answers)
    assert [r.partition_id for r in strategy.outcome.used] == [0, 1]
    assert "array r" in strategy.outcome.dropped[0].reason or "array x" in strategy.outcome.dropped[0].reason


def test_fedprox_sends_its_mu_to_clients(server_identity):
    cfg = load_config("tiny", overrides={"federation": {"strategy": "fedprox"}, "train": {"proximal_mu": 0.3}})
    strategy = make_strategy(cfg, replies.LAYOUT)
    sent = replies.instructions(strategy, replies.global_state(), 2)
    assert protocol.read_instruction(sent[0].content).proximal_mu == pytest.approx(0.3)


@pytest.mark.parametrize("mu", [0.0, 0.2])
def test_fedalign_sends_its_proximal_mu_only_when_asked(mu, server_identity):
    """fedalign.proximal_mu [ours]: the client adds FedProx's term because the message says so, not because
    of the strategy's name; with 0 (the paper's objective) the message has no proximal term at all."""
    cfg = load_config("tiny", overrides={"federation": {"strategy": "fedalign"}, "fedalign": {"proximal_mu": mu}})
    sent = replies.instructions(make_strategy(cfg, replies.LAYOUT), replies.global_state(), 2)
    assert [protocol.read_instruction(m.content).proximal_mu for m in sent] == pytest.approx([mu, mu])
    assert (protocol.PROXIMAL_MU in sent[0].content[protocol.CONFIG]) is (mu > 0)


def test_record_bytes_counts_every_array_payload():
    a = RecordDict({"arrays": ArrayRecord({"w": torch.zeros(100, dtype=torch.float32)})})
    b = RecordDict({"arrays": ArrayRecord({"w": torch.zeros(200, dtype=torch.float32)})})
    assert record_bytes(b) - record_bytes(a) == 400  # 100 more float32 values
    assert record_bytes(a) >= 400
    assert record_bytes(b, "no-such-record") == 0


def test_client_rows_and_partition_order(server_identity):
    glob = replies.global_state()
    strategy = _strategy("fedavg")
    sent = replies.instructions(strategy, glob, 3)
    answers = [replies.reply(sent[i], pid, glob, 5 + pid) for i, pid in enumerate((2, 0, 1))]
    strategy.aggregate_train(1, answers)
    rows = client_rows(strategy.outcome.used)  # aggregated in partition order, not arrival order
    assert [r.partition_id for r in rows] == [0, 1, 2]
    assert rows[2].to_json() == {"partition_id": 2, "num_examples": 7, "train_loss": 3.0, "local_accuracy": 0.5,
                                 "local_test_examples": 4, "train_tokens": replies.TOKENS, "train_seconds": 0.1}


def test_flower_simulation_end_to_end(tiny_grid):
    """3 rounds, 3 clients, a tiny Mixtral, through Flower's simulation engine (the shared grid's FedAvg run)."""
    from fedalign_moe.config import Config

    out = tiny_grid / "fedavg-alpha0.5-seed0"
    cfg = Config.model_validate_json((out / "config.json").read_text())
    summary = json.loads((out / "summary.json").read_text())
    rounds = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rounds] == [1, 2, 3]
    for r in rounds:
        assert {"round", "accuracy", "loss", "uplink_bytes", "downlink_bytes", "seconds"} <= set(r)
        assert len(r["clients"]) == 3 and r["failures"] == 0
        assert r["uplink_bytes"] > 0 and r["downlink_bytes"] == r["uplink_bytes"]  # same tensors each way
    for key in ("strategy", "preset", "alpha", "num_clients", "rounds", "seed", "final_accuracy", "best_accuracy",
                "accuracy_per_round", "uplink_bytes_total", "downlink_bytes_total", "wall_seconds"):
        assert key in summary
    assert summary["accuracy_per_round"] == [r["accuracy"] for r in rounds]
    assert len(summary["global_model_on_client_tests_by_client"]) == 3
    for png in ("accuracy.png", "partition.png", "routing.png"):
        assert (out / png).stat().st_size > 1000
    part = json.loads((out / "partition.json").read_text())
    assert np.array(part["counts"]).shape == (3, 4)
    # the saved global model, loaded into a freshly built one, reproduces the final accuracy
    from safetensors.torch import load_file

    from fedalign_moe.training.local import evaluate, load_state
    from fedalign_moe.training.setup import open_workspace

    ws = open_workspace(cfg)
    load_state(ws.built.model, load_file(out / "global_trainable.safetensors"))
    assert evaluate(ws.built.model, ws.global_test(), 64)["accuracy"] == pytest.approx(summary["final_accuracy"])
    # throughput: every client trains one epoch over its split each round, so every real token once a round
    tokens_per_round = sum(int(ws.client(pid)[0].attention_mask_NS.sum()) for pid in range(3))
    assert [r["train_tokens"] for r in rounds] == [tokens_per_round] * 3
    assert summary["train_tokens_total"] == 3 * tokens_per_round and summary["train_tokens_per_second"] > 0


def _dead(msg):
    """Every client process has died: each message comes back as Flower's error."""
    from flwr.app import Error
    from flwr.common.constant import ErrorCode

    return Message(Error(code=ErrorCode.CLIENT_APP_CRASHED, reason="actor died"), reply_to=msg)


def test_a_run_whose_clients_all_died_stops_and_says_so(tmp_path, server_identity):
    """Flower's simulation does not bring dead client actors back; the server stops instead of idling."""
    from fedalign_moe.experiment import _same_result
    from fedalign_moe.federation.server import run_federation
    from fedalign_moe.training.setup import open_log, open_workspace

    cfg = load_config("tiny", overrides={"out_dir": str(tmp_path), "federation": {"rounds": 6}})
    ws = open_workspace(cfg)
    grid = replies.ScriptedGrid([1, 2, 3], _dead)
    summary = run_federation(grid, ws, open_log(ws))
    assert "stopped after round 2" in summary["stopped_early"] and "3x the client process died: actor died" in summary["stopped_early"]
    assert len(summary["accuracy_per_round"]) == 2 and len(grid.sent) == 3  # two rounds and the final evaluation
    rows = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["sent"], r["replied"], r["failures"], r["adopted"]) for r in rows] == [(3, 0, 3, False)] * 2
    summary["config_json"] = cfg.to_json()
    assert not _same_result(summary, cfg)  # compare runs it again next time


@pytest.mark.parametrize("name", ["fedalign", "fedadam", "fedavgm"])
def test_a_round_outcome_carries_the_next_state_which_takes_effect_only_when_committed(name, server_identity):
    strategy = _strategy(name)
    glob = replies.global_state()
    sent = replies.instructions(strategy, glob, 3)
    before = strategy.state_dict()
    answers = [replies.reply(sent[pid], pid, replies.perturbed(glob, pid), 10,
                             replies.routing([20.0, 15.0, 5.0, 0.0] if pid else None)) for pid in range(3)]
    outcome = strategy.aggregate_round(1, answers)
    assert not outcome.dropped, outcome.dropped
    assert outcome.arrays is not None and [r.partition_id for r in outcome.used] == [0, 1, 2]
    assert outcome.state and any(not torch.equal(outcome.state[k], before.get(k, outcome.state[k] + 1)) for k in outcome.state)
    now = strategy.state_dict()  # not adopted (yet): the strategy is as it was
    assert now.keys() == before.keys() and all(torch.equal(now[k], before[k]) for k in now)
    strategy.commit(outcome)
    assert all(torch.equal(strategy.state_dict()[k], outcome.state[k]) for k in outcome.state)
    assert (outcome.diagnostics is not None) == (name == "fedalign")


def test_the_deployed_server_logs_a_typed_round_in_one_line(caplog):
    from fedalign_moe.federation.server_app import log_round
    from fedalign_moe.records import Exchange, RoundRecord

    ex = Exchange(0, 3, 2, ({"node_id": 7, "partition_id": 1, "reason": "timeout"},), False, "no valid reply", 0.1, 0.01)
    with caplog.at_level("INFO", logger="flwr"):
        log_round(RoundRecord(4, None, 1.25, None, None, 10, 20, 1, 0, 0.0, 2.0, (), ex))
    assert "round 4: accuracy nan, loss 1.2500, 2 of 3 replies used, 1 failures, previous model kept (no valid reply), 2.0s" in caplog.text


def test_an_environment_is_restored_as_it_was(monkeypatch):
    import os

    from fedalign_moe.federation.server_app import environment

    monkeypatch.setenv("FEDALIGN_A", "kept")
    monkeypatch.delenv("FEDALIGN_B", raising=False)
    with environment(FEDALIGN_A="inside", FEDALIGN_B="new"):
        assert (os.environ["FEDALIGN_A"], os.environ["FEDALIGN_B"]) == ("inside", "new")
    assert os.environ["FEDALIGN_A"] == "kept" and "FEDALIGN_B" not in os.environ


def test_a_round_whose_strategy_state_cannot_be_read_reports_nothing_of_the_round_before(server_identity, monkeypatch):
    strategy = _strategy("fedavg")
    glob = replies.global_state()
    sent = replies.instructions(strategy, glob, 3)
    strategy.aggregate_train(1, [replies.reply(sent[pid], pid, glob) for pid in range(3)])
    assert len(strategy.outcome.used) == 3

    def unreadable():
        raise RuntimeError("state lost")
    monkeypatch.setattr(strategy, "state_dict", unreadable)
    with pytest.raises(RuntimeError):
        strategy.aggregate_round(2, [])
    assert strategy.outcome.used == [] and strategy.outcome.dropped == []
