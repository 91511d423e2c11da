"""One client must never break or poison a federation: every bad reply, to every strategy, is dropped
and named, and the global model is what the good replies alone give."""

import math

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MetricRecord
from flwr.common.constant import ErrorCode

import replies
from fedalign_moe.config import load_config
from fedalign_moe.federation import protocol
from fedalign_moe.federation.screening import update_norm

STRATEGIES = replies.STRATEGIES
pytestmark = pytest.mark.usefixtures("fast_flower_arrays")
GOOD = 4  # partitions 0-3 answer well; partition 4 is the bad one


def _strategy(name: str):
    return replies.strategy(name, GOOD + 1)


def _arrays(content):
    return content[protocol.ARRAYS]


def _set_array(content, name, fn):
    state = _arrays(content).to_torch_state_dict()
    fn(state, name)
    content[protocol.ARRAYS] = ArrayRecord(state)


def _nan(state, name):
    state[name].view(-1)[0] = float("nan")


def _inf(state, name):
    state[name].view(-1)[-1] = float("inf")


# (what is wrong, how to break a good reply, words the reason must hold)
BAD = {
    "nan-in-expert": (lambda c: _set_array(c, "x", _nan), "NaN or Inf"),
    "inf-in-router": (lambda c: _set_array(c, "r", _inf), "NaN or Inf"),
    "wrong-shape": (lambda c: _set_array(c, "head", lambda s, n: s.__setitem__(n, torch.zeros(7))), "expected"),
    "wrong-dtype": (lambda c: _set_array(c, "head", lambda s, n: s.__setitem__(n, s[n].double())), "expected"),
    "missing-array": (lambda c: _set_array(c, "head", lambda s, n: s.pop(n)), "missing ['head']"),
    "extra-array": (lambda c: _set_array(c, "evil", lambda s, n: s.__setitem__(n, torch.ones(2))), "unexpected ['evil']"),
    "missing-metric": (lambda c: c[protocol.METRICS].pop(protocol.TRAIN_LOSS), "lacks 'train-loss'"),
    "extra-metric": (lambda c: c[protocol.METRICS].__setitem__("weight-me", 1e9), "unexpected keys"),
    "nan-routing-p": (lambda c: c[protocol.METRICS].__setitem__(protocol.ROUTING_P, [float("nan")] * 4), "non-finite"),
    "p-off-simplex": (lambda c: c[protocol.METRICS].__setitem__(protocol.ROUTING_P, [1e6, 0.0, 0.0, 0.0]), "distribution"),
    "n-of-1e9": (lambda c: c[protocol.METRICS].__setitem__(protocol.ROUTING_N, [1e9, 10.0, 10.0, 10.0]), "whole counts"),
    "negative-examples": (lambda c: c[protocol.METRICS].__setitem__(protocol.NUM_EXAMPLES, -50), "num-examples"),
    "zero-examples": (lambda c: c[protocol.METRICS].__setitem__(protocol.NUM_EXAMPLES, 0), "num-examples"),
    "zero-tokens": (lambda c: c[protocol.METRICS].__setitem__(protocol.TRAIN_TOKENS, 0), "train-tokens"),
    "steps-not-what-the-config-asks": (lambda c: c[protocol.METRICS].__setitem__(protocol.TRAIN_STEPS, 1000),
                                       "examples make 1 steps"),
    "partition-out-of-range": (lambda c: c[protocol.METRICS].__setitem__(protocol.PARTITION_ID, 99), "partition-id"),
    "missing-record": (lambda c: c.pop(protocol.METRICS), "records"),
    "overlap-of-1e6": (lambda c: c.__setitem__(protocol.FEDALIGN_STATS, ArrayRecord(
        {"o": torch.full((1, 4), 1e6), "m": torch.full((1, 4), 0.2), "mu": torch.ones(1, 4, 3)})),
        "o must lie in [0, 1]|records"),  # FedAlign-MoE reads o; the others never asked for it
    "update-times-1e6": (None, "norm"),
    # the record describes an array, its bytes say something else (a hostile client writes both)
    "garbage-bytes": (lambda c: _forge_array(c, "head", lambda a: b"not an array at all"), "not a readable array"),
    "truncated-bytes": (lambda c: _forge_array(c, "x", lambda a: a.data[: len(a.data) // 2]), "not a readable array"),
    "bytes-of-another-shape": (lambda c: _forge_array(c, "head", lambda a: Array(np.zeros(3, np.float32)).data),
                               "its bytes hold float32 (3,)"),
    # the crash classes of issue 33: each of these once raised out of aggregate_train and ended the run
    "stats-mu-of-another-width": (lambda c: _set_stats(c, "mu", torch.ones(1, 4, 7)), "mu|records"),
    "stats-garbage-bytes": (lambda c: _forge_stats(c, "mu", lambda a: b"\x00" * 17), "not a readable array|records"),
    "stats-object-dtype": (lambda c: _forge_stats(c, "o", lambda a: _npy("|O", False, (1, 4), b"\x00" * 32)), "its bytes hold|records"),
    "stats-unicode-dtype": (lambda c: _forge_stats(c, "o", lambda a: _npy("<U1", False, (1, 4), b"\x00" * 16)), "its bytes hold|records"),
    "stats-big-endian": (lambda c: _forge_stats(c, "m", lambda a: _npy(">f4", False, (1, 4), b"\x00" * 16)), "its bytes hold|records"),
    "stats-record-of-float64": (lambda c: _set_stats(c, "o", torch.full((1, 4), 0.5, dtype=torch.float64)), "expected float32|records"),
    "header-negative-shape": (lambda c: _forge_array(c, "head", lambda a: _npy("<f4", False, (-6,), b"")),
                              "not a readable array|its bytes hold"),
    "header-absurd-shape": (lambda c: _forge_array(c, "head", lambda a: _npy("<f4", False, (10**13,), b"\x00" * 24)), "its bytes hold"),
    "header-fortran-order": (lambda c: _forge_array(c, "x", lambda a: _npy("<f4", True, (4, 2, 5), b"\x00" * 160)), "Fortran"),
    "header-sub-array-dtype": (lambda c: _forge_array(c, "head", lambda a: _npy("('<f4', (2,))", False, (3,), b"\x00" * 24)),
                               "its bytes hold"),
    "record-shape-absurd": (lambda c: _forge_array(c, "head", lambda a: a.data, shape=(10**13,)), "expected"),
    "stype-not-numpy": (lambda c: _forge_array(c, "head", lambda a: a.data, stype="torch.raw"), "serialised as"),
    "config-record-as-metrics": (lambda c: c.__setitem__(protocol.METRICS, ConfigRecord(dict(c[protocol.METRICS]))), "not a MetricRecord"),
    "metrics-record-as-arrays": (lambda c: c.__setitem__(protocol.ARRAYS, MetricRecord({"head": 1.0})), "not an ArrayRecord|records"),
}


def _npy(descr: str, fortran: bool, shape: tuple, payload: bytes) -> bytes:
    """The bytes of a .npy file whose header says ``descr``, ``fortran`` and ``shape``, whatever follows it."""
    descr = descr if descr.startswith("(") else repr(descr)
    header = f"{{'descr': {descr}, 'fortran_order': {fortran}, 'shape': {tuple(shape)!r}, }}"
    header += " " * (63 - (len(header) + 10) % 64) + "\n"
    return b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header.encode("latin1") + payload


def _set_stats(content, name, tensor):
    stats = content[protocol.FEDALIGN_STATS].to_torch_state_dict() if protocol.FEDALIGN_STATS in content else {
        "o": torch.full((1, 4), 0.5), "m": torch.full((1, 4), 0.2), "mu": torch.ones(1, 4, 3)}
    stats[name] = tensor
    content[protocol.FEDALIGN_STATS] = ArrayRecord(stats)


def _forge_stats(content, name, new_bytes):
    if protocol.FEDALIGN_STATS not in content:  # a strategy that never asked for statistics: the record is extra
        _set_stats(content, name, torch.zeros(1, 4))
    _forge_array(content, name, new_bytes, key=protocol.FEDALIGN_STATS)


def _forge_array(content, name, new_bytes, key=protocol.ARRAYS, shape=None, stype=None):
    """Keep the record's dtype and shape for ``name`` (or claim ``shape`` / ``stype``), replace the bytes."""
    arrays = content[key]
    old = arrays[name]
    forged = {k: v for k, v in arrays.items()}
    forged[name] = Array(dtype=old.dtype, shape=tuple(shape or old.shape), stype=stype or old.stype, data=new_bytes(old))
    content[key] = ArrayRecord(forged)


def _run(name: str, bad_case: str | None):
    """Aggregate 4 good replies plus (optionally) one bad one; the strategy after the round."""
    glob = replies.global_state()
    strategy = _strategy(name)
    sent = replies.instructions(strategy, glob, GOOD + 1)
    answers = [replies.reply(sent[pid], pid, replies.perturbed(glob, pid)) for pid in range(GOOD)]
    if bad_case is not None:
        breaker, _ = BAD[bad_case]
        state = replies.perturbed(glob, GOOD)
        if breaker is None:  # the same direction, a million times longer
            state = {k: glob[k] + 1e6 * (v - glob[k]) for k, v in state.items()}
        bad = replies.reply(sent[GOOD], GOOD, state)
        if breaker is not None:
            breaker(bad.content)
        answers.insert(2, bad)  # arrival order is not partition order
    arrays, _ = strategy.aggregate_train(1, answers)
    return strategy, arrays, sent[GOOD].metadata.dst_node_id


@pytest.mark.parametrize("name", STRATEGIES)
@pytest.mark.parametrize("case", sorted(BAD))
def test_a_bad_reply_is_dropped_named_and_changes_nothing(name, case, server_identity):
    strategy, arrays, bad_node = _run(name, case)
    failures = strategy.outcome.dropped
    assert len(failures) == 1, failures
    assert failures[0].node_id == bad_node, failures[0]
    assert any(words in failures[0].reason for words in BAD[case][1].split("|")), failures[0]
    assert [r.partition_id for r in strategy.outcome.used] == list(range(GOOD))
    _, clean, _ = _run(name, None)
    for key, value in clean.to_torch_state_dict().items():
        assert torch.equal(arrays.to_torch_state_dict()[key], value), key


@pytest.mark.parametrize("name", STRATEGIES)
def test_errors_timeouts_and_duplicate_partitions(name, server_identity):
    glob = replies.global_state()
    strategy = _strategy(name)
    sent = replies.instructions(strategy, glob, 6)
    good = [replies.reply(sent[pid], pid, replies.perturbed(glob, pid)) for pid in range(3)]
    twin = replies.reply(sent[3], 0, replies.perturbed(glob, 9))  # node 4 claims partition 0 as well
    crashed = Message(Error(code=ErrorCode.CLIENT_APP_CRASHED, reason="actor died"), reply_to=sent[4])
    raised = Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason="Traceback...\nValueError: boom"),
                     reply_to=sent[5])
    strategy.aggregate_train(1, [*good, twin, crashed, raised])
    node = [m.metadata.dst_node_id for m in sent]
    reasons = {f.node_id: f.reason for f in strategy.outcome.dropped}
    assert "the client process died" in reasons[node[4]] and "raised an error: ValueError: boom" in reasons[node[5]]
    assert "claimed by 2 replies" in reasons[node[0]] and "claimed by 2 replies" in reasons[node[3]]
    assert [r.partition_id for r in strategy.outcome.used] == [1, 2]
    # a node that never answers is a timeout, and says so
    strategy.aggregate_train(1, good[1:])
    assert {f.node_id: f.reason for f in strategy.outcome.dropped}[node[0]].startswith("timeout")


@pytest.mark.parametrize("name", ["fedavg", "fedalign"])
def test_norm_rule_is_per_local_step(name, server_identity):
    """A client with 20x the data moves 20x as far and stays; one that moves 20x as far on the same data goes."""
    glob = replies.global_state()
    strategy = _strategy(name)
    sent = replies.instructions(strategy, glob, GOOD + 1)

    def moved(seed, times):
        step = replies.perturbed({k: torch.zeros_like(v) for k, v in glob.items()}, seed, 0.01)
        return {k: glob[k] + times * step[k] for k in glob}

    answers = [replies.reply(sent[pid], pid, moved(pid, 1)) for pid in range(3)]  # 10 examples: 1 step each
    answers.append(replies.reply(sent[3], 3, moved(3, 20), examples=20 * replies.BATCH))  # 20 steps
    answers.append(replies.reply(sent[4], 4, moved(4, 20)))  # 1 step, 20x as far
    strategy.aggregate_train(1, answers)
    assert [r.partition_id for r in strategy.outcome.used] == [0, 1, 2, 3]
    assert [f.partition_id for f in strategy.outcome.dropped] == [4]
    assert "update norm per local step" in strategy.outcome.dropped[0].reason


def test_update_norm_against_the_global_rows():
    glob = replies.global_state()
    moved = {k: v + 1.0 for k, v in glob.items()}
    reply = protocol.TrainReply(1, 0, 1, None, None, ArrayRecord(moved), None, None)
    expected = math.sqrt(sum(v.numel() for v in glob.values()))
    assert update_norm(reply, glob, replies.LAYOUT) == pytest.approx(expected)


def test_instruction_checks_what_a_server_may_ask(server_identity):
    strategy = _strategy("fedalign")
    sent = replies.instructions(strategy, replies.global_state(), 1)[0]
    sent.content[protocol.CONFIG][protocol.REG_LAMBDA] = float("nan")
    with pytest.raises(protocol.InstructionError, match="reg-lambda"):
        protocol.read_instruction(sent.content)
    sent.content[protocol.CONFIG][protocol.REG_LAMBDA] = 0.1
    sent.content[protocol.FEDALIGN_TARGET] = ArrayRecord({"p_g": torch.full((1, 4), 0.5), "alpha": torch.ones(1, 4)})
    with pytest.raises(protocol.InstructionError, match="simplex"):
        protocol.read_instruction(sent.content)


def test_a_broken_aggregate_is_never_adopted(tmp_path, server_identity):
    """Finite replies can still average to a model whose outputs overflow: the round keeps the old model."""
    from fedalign_moe.federation.server import _Server
    from fedalign_moe.training.setup import open_log, open_workspace

    cfg = load_config("tiny", overrides={"out_dir": str(tmp_path)})
    ws = open_workspace(cfg)
    server = _Server(replies.ScriptedGrid([1, 2, 3]), ws, open_log(ws), None)
    before = server.arrays.to_torch_state_dict()
    nan = {k: torch.full_like(v, float("nan")) for k, v in before.items()}
    assert server.adopt(ArrayRecord(nan)) == "the aggregate holds NaN or Inf"
    huge = {k: v * 1e30 for k, v in before.items()}  # finite weights, infinite logits
    assert server.adopt(ArrayRecord(huge)) == "the aggregate's test loss is not finite"
    assert server.adopt(None) == "no valid reply"
    for name, value in server.arrays.to_torch_state_dict().items():  # what the next round sends
        assert torch.equal(value, before[name])
    assert np.isfinite(server.evaluation()["loss"])
