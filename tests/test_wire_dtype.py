"""``federation.wire_dtype = "bfloat16"``: the bfloat16 array on the wire (known bytes, checked reads), every
strategy's aggregate equal to the one of float32 replies holding what the server rebuilds (the float32 global
plus each client's bfloat16 update), and a run end to end with half the bytes each way."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord

import replies
from fedalign_moe.federation import protocol
from fedalign_moe.federation.server import record_bytes


def test_a_bfloat16_array_is_its_16_bits_and_reads_back_exactly():
    t = torch.tensor([[1.0, -2.5, 3.0e38], [1e-3, 0.0, 1.0 + 2**-9]])
    array = protocol.bfloat16_array(t)
    assert array.dtype == "bfloat16" and tuple(array.shape) == (2, 3)
    got = protocol.read_array(array, "x", (2, 3), "bfloat16")
    assert got.dtype == torch.bfloat16 and torch.equal(got, t.to(torch.bfloat16))
    # 1 + 2^-9 rounds to 1 in bfloat16 (8 bits of mantissa); float32's range survives
    assert got[1, 2].item() == 1.0 and got[0, 2].item() == pytest.approx(3.0e38, rel=1e-2)
    bits = np.frombuffer(array.data[-12:], dtype="<u2")  # the payload: six 16-bit numbers
    assert bits[0] == 0x3F80 and bits[1] == 0xC020  # 1.0 and -2.5 in bfloat16


def test_a_forged_bfloat16_array_is_refused_by_name():
    buf = io.BytesIO()
    np.save(buf, np.zeros(3, dtype="<f2"))
    forged = Array(dtype="bfloat16", shape=(3,), stype="numpy.ndarray", data=buf.getvalue())  # float16 bits
    with pytest.raises(protocol.ReplyError, match=r"update x: its bytes hold float16 \(3,\), the record says bfloat16 "
                                                  r"\(3,\) \(stored as uint16\)"):
        protocol.read_array(forged, "update x")


def _round(name: str, glob, trained, sizes, wire: str):
    s = replies.strategy(name, len(trained), wire_dtype=wire)
    sent = replies.instructions(s, glob, len(trained))
    answers = [replies.reply(m, i, u, n) for i, (m, u, n) in enumerate(zip(sent, trained, sizes))]
    arrays, _ = s.aggregate_train(1, answers)
    return s, sent, answers, arrays


@pytest.mark.parametrize("name", replies.STRATEGIES)
def test_every_strategy_aggregates_the_float32_global_plus_each_bfloat16_update(name, server_identity):
    """What a bfloat16 round aggregates is, bit for bit, what a float32 round aggregates when each client's
    reply holds g + bf16(w_i - bf16(g)): clients start from the global rounded to bfloat16, and the server
    adds their rounded updates to its own float32 global."""
    glob = replies.global_state()
    rounded = {k: v.to(torch.bfloat16).float() for k, v in glob.items()}  # what the clients receive
    steps = [{k: v - glob[k] for k, v in replies.perturbed(glob, seed, 0.01).items()} for seed in range(5)]
    sizes = [10, 30, 60, 20, 40]
    s, sent, answers, narrow = _round(name, glob, [{k: rounded[k] + d[k] for k in d} for d in steps], sizes, "bfloat16")
    assert all(a.dtype == "bfloat16" for m in sent for a in m.content[protocol.ARRAYS].values())
    assert protocol.UPDATE in answers[0].content and protocol.ARRAYS not in answers[0].content
    assert s.outcome.dropped == [] and len(s.outcome.used) == 5
    rebuilt = [{k: glob[k] + d[k].to(torch.bfloat16).float() for k in glob} for d in steps]
    _, _, _, wide = _round(name, glob, rebuilt, sizes, "float32")
    assert narrow is not None and wide is not None
    got, expected = narrow.to_torch_state_dict(), wide.to_torch_state_dict()
    for k in glob:
        assert torch.equal(got[k], expected[k]), k
    # the same steps taken from the float32 global, in float32: the aggregate moves by what they move it,
    # to bfloat16's precision of a step (not of a weight); an adaptive server step divides by |step| + tau,
    # which magnifies a small step's rounding
    _, _, _, exact = _round(name, glob, [{k: glob[k] + d[k] for k in d} for d in steps], sizes, "float32")
    slack = 0.05 if name in ("fedadagrad", "fedadam", "fedyogi") else 0.01
    for k, v in exact.to_torch_state_dict().items():
        moved = (v - glob[k]).abs().max()
        assert moved > 0 and (got[k] - v).abs().max() <= slack * moved, k


def test_half_the_bytes_each_way(server_identity):
    glob = replies.global_state()
    trained = [replies.perturbed(glob, seed) for seed in range(3)]
    byte_counts = {}
    for wire in ("float32", "bfloat16"):
        _, sent, answers, _ = _round("fedavg", glob, trained, [10, 20, 30], wire)
        byte_counts[wire] = (record_bytes(sent[0].content), record_bytes(answers[0].content))
    header = 128 * 3  # numpy's .npy header, one per array
    for way in (0, 1):
        assert byte_counts["bfloat16"][way] - header / 2 < byte_counts["float32"][way] / 2 + header / 2


def test_a_reply_that_ignores_the_wire_dtype_or_overflows_is_dropped_by_name(server_identity, caplog):
    glob = {**replies.global_state(), "head": torch.full((6,), 3.0e38)}
    s = replies.strategy("fedavg", 4, wire_dtype="bfloat16")
    sent = replies.instructions(s, glob, 4)
    good = [replies.reply(m, i, replies.perturbed(glob, i, 0.01)) for i, m in enumerate(sent[:2])]
    wide = replies.reply(sent[2], 2, glob)  # float32 arrays, as if the instruction had said nothing
    wide.content[protocol.ARRAYS] = ArrayRecord(glob)
    del wide.content[protocol.UPDATE]
    overflow = replies.reply(sent[3], 3, glob)
    overflow.content[protocol.UPDATE] = protocol.bfloat16_record({k: torch.full_like(v, 3.0e38) for k, v in glob.items()})
    arrays, _ = s.aggregate_train(1, [*good, wide, overflow])
    reasons = {f.partition_id: f.reason for f in s.outcome.dropped}
    assert "expected ['metrics', 'update']" in reasons[2]
    assert "the global parameters plus the update overflow" in reasons[3]
    assert arrays is not None and [r.partition_id for r in s.outcome.used] == [0, 1]


def test_the_client_refuses_an_unknown_wire_dtype(server_identity):
    s = replies.strategy("fedavg", 1)
    sent = replies.instructions(s, replies.global_state(), 1)[0]
    sent.content[protocol.CONFIG][protocol.WIRE_DTYPE] = "int8"
    with pytest.raises(protocol.InstructionError, match="wire-dtype 'int8' is neither 'float32' nor 'bfloat16'"):
        protocol.read_instruction(sent.content)
    sent.content[protocol.CONFIG][protocol.WIRE_DTYPE] = "bfloat16"  # but float32 arrays
    with pytest.raises(protocol.InstructionError, match=r"instruction array r: float32 \(4, 3\), expected bfloat16"):
        protocol.read_instruction(sent.content)


def test_a_run_in_bfloat16_end_to_end(tmp_path, monkeypatch):
    """The real ServerApp loop and ClientApp (in this process): two rounds of FedAlign-MoE whose every
    training message travels in bfloat16, against the same run in float32."""
    from fedalign_moe.config import load_config
    from fedalign_moe.federation.client_app import cached_workspace
    from in_process import run_in_process

    rounds = {}
    for wire in ("float32", "bfloat16"):
        cached_workspace.cache_clear()
        cfg = load_config("tiny", overrides={"out_dir": str(tmp_path / wire), "data": {"max_train": 90, "max_test": 30},
                                             "federation": {"strategy": "fedalign", "wire_dtype": wire}})
        summary = run_in_process(cfg, monkeypatch)
        assert summary["rounds_not_adopted"] == [] and summary["failures_total"] == 0
        rounds[wire] = [json.loads(line) for line in (tmp_path / wire / "metrics.jsonl").read_text().splitlines()]
    cached_workspace.cache_clear()
    for wide, narrow in zip(rounds["float32"], rounds["bfloat16"]):
        assert 0.45 < narrow["downlink_bytes"] / wide["downlink_bytes"] < 0.55
        assert narrow["stats_uplink_bytes"] == wide["stats_uplink_bytes"]  # the statistics stay float32
        model_up = [r["uplink_bytes"] - r["stats_uplink_bytes"] for r in (wide, narrow)]
        assert 0.45 < model_up[1] / model_up[0] < 0.55
        assert narrow["loss"] == pytest.approx(wide["loss"], rel=0.05)  # a close model, not the same bits
