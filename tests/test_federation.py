"""Strategies against hand-computed aggregates, and a real Flower simulation end to end."""

import json

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, Message, Metadata, MetricRecord, RecordDict

from fedalign_moe.config import load_config
from fedalign_moe.federation import keys
from fedalign_moe.federation.server import client_rows, record_bytes
from fedalign_moe.federation.strategies import make_strategy


def _reply(tensors: dict | ArrayRecord, n: int, pid: int, routing_n: list[float] | None = None) -> Message:
    metrics = MetricRecord({keys.NUM_EXAMPLES: n, keys.PARTITION_ID: pid, keys.TRAIN_LOSS: 1.0 + pid,
                            keys.LOCAL_ACCURACY: 0.5, keys.LOCAL_TEST_EXAMPLES: 4,
                            keys.ROUTING_P: [0.25] * 4, keys.ROUTING_N: routing_n or [1.0] * 4})
    arrays = tensors if isinstance(tensors, ArrayRecord) else ArrayRecord(tensors)
    content = RecordDict({keys.ARRAYS: arrays, keys.METRICS: metrics})
    meta = Metadata(run_id=1, message_id=f"m{pid}", src_node_id=pid + 1, dst_node_id=0, reply_to_message_id="x",
                    group_id="1", created_at=0.0, ttl=60.0, message_type="train")
    return Message(content=content, metadata=meta)


@pytest.mark.parametrize("strategy", ["fedavg", "fedprox"])
def test_aggregation_is_the_example_weighted_average(strategy):
    cfg = load_config("tiny", overrides={"federation": {"strategy": strategy}})
    g = torch.Generator().manual_seed(0)
    updates = [{"w": torch.randn(3, 2, generator=g), "b": torch.randn(5, generator=g)} for _ in range(3)]
    sizes = [10, 30, 60]
    replies = [_reply(u, n, i) for i, (u, n) in enumerate(zip(updates, sizes))]
    arrays, _ = make_strategy(cfg).aggregate_train(1, replies)
    got = arrays.to_torch_state_dict()
    for name in ("w", "b"):
        # by hand: (10 w0 + 30 w1 + 60 w2) / 100
        expected = (10 * updates[0][name] + 30 * updates[1][name] + 60 * updates[2][name]) / 100
        assert torch.allclose(got[name], expected, atol=1e-6)


def test_fedmoe_clients_upload_their_sub_moe_only_and_the_server_aggregates_the_same():
    from fedalign_moe.core.aggregate import LayerNames
    from fedalign_moe.core.fedmoe import fedmoe_aggregate
    from fedalign_moe.federation.fedmoe import FedMoE, pack_update
    from fedalign_moe.models.base import MoELayerLayout, MoELayout

    layout = MoELayout(num_experts=4, top_k=1, layers=(MoELayerLayout(0, "r", ("x",)),))
    g = torch.Generator().manual_seed(0)
    glob = {"r": torch.randn(4, 3, generator=g), "x": torch.randn(4, 2, 5, generator=g), "head": torch.randn(6, generator=g)}
    states = [{k: v + torch.randn(v.shape, generator=g) for k, v in glob.items()} for _ in range(3)]
    counts = [[50.0, 50.0, 0.0, 0.0], [0.0, 0.0, 80.0, 20.0], [97.0, 1.0, 1.0, 1.0]]  # sub-MoEs at coverage 0.9:
    strategy = FedMoE(layout, coverage=0.9)                                            # {0,1}, {2,3}, {0}
    strategy.global_state = glob
    packed, held = zip(*(pack_update(s, layout, torch.tensor([n]), 0.9) for s, n in zip(states, counts)))
    assert [tuple(a["x"].shape) for a in packed] == [(2, 2, 5), (2, 2, 5), (1, 2, 5)]
    assert list(held) == [[1, 1, 0, 0], [0, 0, 1, 1], [1, 0, 0, 0]]
    full_bytes = record_bytes(RecordDict({"a": ArrayRecord(states[2])}))
    assert record_bytes(RecordDict({"a": packed[2]})) < full_bytes  # three of four experts stay home
    replies = [_reply(a, 10, i, n) for i, (a, n) in enumerate(zip(packed, counts))]
    for reply, h in zip(replies, held):
        reply.content[keys.METRICS][keys.FEDMOE_HELD] = h
    arrays, _ = strategy.aggregate_train(1, replies)
    expected, _ = fedmoe_aggregate(glob, states, torch.tensor([10.0] * 3), torch.tensor(counts).reshape(3, 1, 4),
                                   [LayerNames("r", ("x",))], 0.9, 1)
    got = arrays.to_torch_state_dict()
    for name in glob:  # the rows a client kept home had weight 0 anyway: the same aggregate, bit for bit
        assert torch.equal(got[name], expected[name].float())
    # an upload whose rows do not match its reported sub-MoE is dropped, not aggregated and not fatal
    replies[2].content[keys.METRICS][keys.FEDMOE_HELD] = [1, 1, 0, 0]
    arrays, _ = strategy.aggregate_train(1, replies)
    assert strategy.last_partition_ids == [0, 1]


def test_fedprox_sends_its_mu_to_clients():
    cfg = load_config("tiny", overrides={"federation": {"strategy": "fedprox"}, "train": {"proximal_mu": 0.3}})
    assert make_strategy(cfg).proximal_mu == pytest.approx(0.3)


def test_record_bytes_counts_every_array_payload():
    a = _reply({"w": torch.zeros(100, dtype=torch.float32)}, 1, 0)
    b = _reply({"w": torch.zeros(200, dtype=torch.float32)}, 1, 0)
    assert record_bytes(b.content) - record_bytes(a.content) == 400  # 100 more float32 values
    assert record_bytes(a.content) >= 400
    assert record_bytes(b.content, "no-such-record") == 0


def test_client_rows_skip_failed_replies():
    ok = _reply({"w": torch.zeros(1)}, 5, 2)
    rows = client_rows([ok])
    assert rows == [{"partition_id": 2, "num_examples": 5, "train_loss": 3.0, "local_accuracy": 0.5, "local_test_examples": 4,
                     "train_tokens": 0, "train_seconds": 0.0}]  # a reply without throughput figures counts none


def test_flower_simulation_end_to_end(tmp_path):
    """2 rounds, 3 clients, a tiny Mixtral, through Flower's simulation engine."""
    from fedalign_moe.experiment import run_experiment

    cfg = load_config("tiny", overrides={"out_dir": str(tmp_path / "run")})
    summary = run_experiment(cfg)
    out = tmp_path / "run"
    rounds = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rounds] == [1, 2]
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
    assert [r["train_tokens"] for r in rounds] == [tokens_per_round] * 2
    assert summary["train_tokens_total"] == 2 * tokens_per_round and summary["train_tokens_per_second"] > 0


def test_replies_are_aggregated_in_partition_order():
    from fedalign_moe.federation.server import _reply_order

    replies = [_reply({"w": torch.zeros(1)}, 1, pid) for pid in (2, 0, 1)]
    assert [int(m.content[keys.METRICS][keys.PARTITION_ID]) for m in sorted(replies, key=_reply_order)] == [0, 1, 2]


class _DeadGrid:
    """A Flower Grid whose every client process has died: each message comes back as an error."""

    def __init__(self):
        self.rounds_sent = 0

    def get_node_ids(self):
        return [1, 2, 3]

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):
        return Message(content=content, dst_node_id=dst_node_id, message_type=message_type, group_id=group_id)

    def send_and_receive(self, messages, timeout=None):
        from flwr.app import Error

        self.rounds_sent += 1
        return [Message(Error(code=0, reason="actor died"), reply_to=m) for m in messages]


def test_a_run_whose_clients_all_died_stops_and_says_so(tmp_path, monkeypatch):
    """Flower's simulation does not bring dead client actors back; the server stops instead of idling."""
    from flwr.supercore.task_identity import TaskIdentity

    from fedalign_moe.experiment import _same_result

    for name in ("_run_id", "_node_id", "_task_id"):  # what Flower sets in a ServerApp process
        monkeypatch.setattr(TaskIdentity, name, 1)
    from fedalign_moe.federation.server import run_federation
    from fedalign_moe.training.setup import open_log, open_workspace

    cfg = load_config("tiny", overrides={"out_dir": str(tmp_path), "federation": {"rounds": 6}})
    ws = open_workspace(cfg)
    grid = _DeadGrid()
    summary = run_federation(grid, ws, open_log(ws))
    assert "stopped after round 2" in summary["stopped_early"]
    assert len(summary["accuracy_per_round"]) == 2 and grid.rounds_sent == 3  # two rounds and the final evaluation
    rows = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["failures"] for r in rows] == [3, 3]
    summary["config_json"] = cfg.to_json()
    assert not _same_result(summary, cfg)  # compare runs it again next time
