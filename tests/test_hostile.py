"""A hostile client, as an attacker would write it: claims that try to buy the model, statistics that try to
capture the router, and replies generated at random (Hypothesis) that try to end the run. Every strategy."""

import math
import os
import re

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import replies
from fedalign_moe.config import load_config
from fedalign_moe.core.robust import bounded_example_counts, norm_clip_scales, water_fill
from fedalign_moe.core.statistics import ModelRoutingStatistics
from fedalign_moe.federation import protocol

STRATEGIES = replies.STRATEGIES
pytestmark = pytest.mark.usefixtures("fast_flower_arrays")
GOOD = 4  # partitions 0-3 answer well; partition 4 is the hostile one
EXAMPLES = 10  # what every honest client of these tests holds

# a short profile in CI, a long one for a benchmark run: HYPOTHESIS_PROFILE=long pytest tests/test_hostile.py
settings.register_profile("ci", max_examples=100, deadline=None, derandomize=True,
                          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
settings.register_profile("long", max_examples=1500, deadline=None,
                          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def _strategy(name: str, sizes: tuple[int, ...] | None = None, **federation):
    return replies.strategy(name, GOOD + 1, sizes, **federation)


def _round(strategy, bad=None, bad_state=None, examples=EXAMPLES, stats=None):
    """4 honest replies and, unless ``bad`` is None, partition 4's reply broken by ``bad(content)``."""
    glob = replies.global_state()
    sent = replies.instructions(strategy, glob, GOOD + 1)
    answers = [replies.reply(sent[pid], pid, replies.perturbed(glob, pid)) for pid in range(GOOD)]
    if bad is not None or bad_state is not None or stats is not None or examples != EXAMPLES:
        msg = replies.reply(sent[GOOD], GOOD, bad_state or replies.perturbed(glob, GOOD), examples=examples, stats=stats)
        if bad is not None:
            bad(msg.content)
        answers.insert(1, msg)
    arrays, _ = strategy.aggregate_train(1, answers)
    return arrays, sent[GOOD].metadata.dst_node_id


def _same(a: ArrayRecord, b: ArrayRecord) -> bool:
    sa, sb = a.to_torch_state_dict(), b.to_torch_state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# ---------------------------------------------------------------- what a claim can buy

def test_water_fill_and_bounded_counts_known_answers():
    assert water_fill(torch.tensor([8.0, 1.0, 1.0]), torch.full((3,), 0.5)).tolist() == [0.5, 0.25, 0.25]
    assert water_fill(torch.tensor([6.0, 3.0, 1.0]), torch.full((3,), 0.5)).tolist() == pytest.approx([0.5, 0.375, 0.125])
    with pytest.raises(ValueError, match="cannot hold"):
        water_fill(torch.ones(3), torch.full((3,), 0.3))
    counts, lowered = bounded_example_counts(torch.tensor([10.0, 10, 10, 10, 16000]), max_ratio=50, max_share=0.5)
    assert counts.tolist() == [67.5, 67.5, 67.5, 67.5, 270.0] and lowered.tolist() == [False] * 4 + [True]
    honest = torch.tensor([14.0, 50, 470, 8, 32, 231, 663, 4, 109, 18])  # specialised, alpha 0.1, seed 0
    counts, lowered = bounded_example_counts(honest, 50, 0.5)
    assert torch.equal(counts, honest) and not lowered.any()
    counts, _ = bounded_example_counts(torch.tensor([1.0, 2.0, 1e39], dtype=torch.float64), 50, 0.5)  # 3: no share cap
    assert counts.tolist() == [1.0, 2.0, 100.0]


@pytest.mark.parametrize("name", STRATEGIES)
def test_a_claimed_count_is_checked_against_the_partition(name, server_identity):
    strategy = _strategy(name, sizes=(EXAMPLES,) * (GOOD + 1))
    arrays, node = _round(strategy, examples=16_000)
    assert [(f.node_id, f.partition_id) for f in strategy.outcome.dropped] == [(node, GOOD)]
    assert "num-examples = 16000, but partition 4 holds 10 training examples" in strategy.outcome.dropped[0].reason
    assert _same(arrays, _round(_strategy(name))[0])


def test_counts_are_checked_unless_a_node_may_bring_its_own_file():
    from fedalign_moe.federation.strategies import checks_example_counts

    assert checks_example_counts(load_config("tiny"))  # a built-in source: the server prepares the same partitions
    for source, mode, checked in (("csv", "auto", False), ("jsonl", "checked", True), ("mmlu-topic", "claimed", False)):
        cfg = load_config("tiny", overrides={"data": {"source": source, "path": "x.csv" if source != "mmlu-topic" else None},
                                             "federation": {"example_counts": mode}})
        assert checks_example_counts(cfg) == checked, (source, mode)


@pytest.mark.parametrize("name", STRATEGIES)
@pytest.mark.parametrize("claim", [16_000, 1e39])
def test_an_unchecked_claim_buys_at_most_the_share_cap(name, claim, server_identity):
    """With counts taken as claimed, 1e39 examples (steps consistent) no longer overflow float32 weights
    into a NaN aggregate, and 16,000 no longer buy 99.75% of the average: half, at most."""
    strategy = _strategy(name, example_counts="claimed")
    arrays, _ = _round(strategy, examples=claim, bad_state=replies.perturbed(replies.global_state(), GOOD, 0.001))
    assert not strategy.outcome.dropped
    assert all(torch.isfinite(t).all() for t in arrays.to_torch_state_dict().values())
    liar = next(r for r in strategy.outcome.used if r.partition_id == GOOD)
    assert liar.weight_capped and liar.weight / sum(r.weight for r in strategy.outcome.used) == pytest.approx(0.5)
    if name in ("fedavg", "fedprox"):  # the head is example-weighted: the liar's pull is half, not 99.75%
        glob = replies.global_state()["head"]
        pulled = arrays.to_torch_state_dict()["head"] - glob
        liar_delta = replies.perturbed(replies.global_state(), GOOD, 0.001)["head"] - glob
        honest = sum(replies.perturbed(replies.global_state(), p)["head"] - glob for p in range(GOOD)) / GOOD
        assert torch.allclose(pulled, 0.5 * liar_delta + 0.5 * honest, atol=1e-6)


@pytest.mark.parametrize("name", ["fedavg", "fedalign"])
def test_the_norm_allowance_does_not_grow_with_the_claim(name, server_identity):
    """16,000 claimed examples make 1,000 consistent steps: the old per-step rule let such a client move
    1,000x an honest one-step update. Its allowance is now reckoned on 50 x the median claim (32 steps)."""
    glob = replies.global_state()
    step = replies.perturbed({k: torch.zeros_like(v) for k, v in glob.items()}, GOOD, 0.01)
    far = {k: glob[k] + 500 * step[k] for k in glob}
    strategy = _strategy(name, example_counts="claimed")
    sent = replies.instructions(strategy, glob, GOOD + 1)
    answers = [replies.reply(sent[p], p, {k: glob[k] + replies.perturbed({k: torch.zeros_like(v) for k, v in glob.items()}, p, 0.01)[k]
                                          for k in glob}) for p in range(GOOD)]
    answers.append(replies.reply(sent[GOOD], GOOD, far, examples=16_000))
    strategy.aggregate_train(1, answers)
    assert [f.partition_id for f in strategy.outcome.dropped] == [GOOD]
    assert "update norm per local step" in strategy.outcome.dropped[0].reason


# ---------------------------------------------------------------- what statistics can buy

def _capture_stats(n_E, p_E, o=1.0, m=1.0):
    n = torch.tensor([n_E], dtype=torch.float32)
    return ModelRoutingStatistics(torch.tensor([p_E]), n, torch.full((1, 4), o), torch.full((1, 4), m),
                                  torch.ones(1, 4, replies.H), replies.TOKENS)


@pytest.mark.parametrize("stats, words", [
    # full consistency claimed on every expert, all tokens and probability on expert 0
    (_capture_stats([20.0, 20, 0, 0], [1.0, 0, 0, 0]), "no token was routed to"),
    # tokens spread to pass the first rule, probability still one-hot: margins outweigh probability
    (_capture_stats([10.0, 10, 10, 10], [1.0, 0, 0, 0]), "exceeds p x tokens"),
])
@pytest.mark.parametrize("name", ["fedalign", "fedalign-consistency"])
def test_statistics_that_contradict_their_own_definitions_are_dropped(name, stats, words, server_identity):
    strategy = _strategy(name)
    arrays, node = _round(strategy, stats=stats)
    assert [f.node_id for f in strategy.outcome.dropped] == [node] and words in strategy.outcome.dropped[0].reason
    assert _same(arrays, _round(_strategy(name))[0])


def test_router_share_factor_bounds_what_in_range_statistics_buy(server_identity):
    """The capture that passes every rule (attacks.hostile_statistics) takes expert 0's router row; with
    fedalign.router_share_factor = 2 it weighs at most twice its example share (0.2) there."""
    from fedalign_moe.config import AttackConfig
    from fedalign_moe.core.robust import bounded_shares
    from fedalign_moe.federation.attacks import hostile_statistics

    bounded = bounded_shares(torch.tensor([[0.9, 0.3], [0.05, 0.3], [0.05, 0.4]]), torch.full((3,), 0.5))
    assert torch.allclose(bounded, torch.tensor([[0.5, 0.3], [0.25, 0.3], [0.25, 0.4]]))
    capture = hostile_statistics(AttackConfig(kind="capture"), replies.routing(), replies.K)
    for factor, most in ((None, 0.7), (2.0, 0.4 + 1e-6)):
        strategy = _strategy("fedalign")
        strategy.options = strategy.options.model_copy(update={"router_share_factor": factor})
        _round(strategy, stats=capture)
        assert not strategy.outcome.dropped
        omega_CE = strategy.last.omega_LCE[0]
        liar = [r.partition_id for r in strategy.outcome.used].index(GOOD)
        assert (omega_CE[liar, 0] > most) == (factor is None) and omega_CE.sum(0).tolist() == pytest.approx([1.0] * 4)


def test_attacks_as_a_hostile_client_sends_them(server_identity):
    """attacks.py: sign-flip and scale move the update as named; inflate's step count is the one the server
    derives, so only the count check catches it; capture passes the screen (tested above)."""
    from fedalign_moe.config import AttackConfig
    from fedalign_moe.federation.attacks import hostile_claim, hostile_update

    g, w = {"a": torch.tensor([1.0, 2.0])}, {"a": torch.tensor([2.0, 0.0])}
    assert hostile_update(AttackConfig(kind="sign-flip"), w, g)["a"].tolist() == [0.0, 4.0]
    assert hostile_update(AttackConfig(kind="scale", factor=3), w, g)["a"].tolist() == [4.0, -4.0]
    work = protocol.LocalWork(replies.BATCH, 48, 1)
    figures = protocol.TrainFigures(1.0, 1, 20, 0.1, 0.5, 1.0, 4)
    claimed, forged = hostile_claim(AttackConfig(kind="inflate"), EXAMPLES, figures, work)
    assert (claimed, forged.train_steps) == (1000, work.steps(1000))
    for counts, dropped in (("auto", True), ("claimed", False)):
        strategy = _strategy("fedavg", sizes=(EXAMPLES,) * (GOOD + 1), example_counts=counts)
        _round(strategy, examples=claimed)
        assert bool(strategy.outcome.dropped) == dropped


def test_an_attack_is_refused_outside_a_simulation_and_checked_at_the_edge():
    from fedalign_moe.config import UserError
    from fedalign_moe.federation.node_policy import NodePolicy, NodePolicyError

    cfg = load_config("tiny", overrides={"attack": {"kind": "sign-flip"}})
    with pytest.raises(NodePolicyError, match="hostile clients exist in simulations only"):
        NodePolicy.of_node({"partition-id": 0, "num-partitions": 3}, environ={}).apply(cfg)
    with pytest.raises((UserError, ValueError), match="attack.clients"):
        load_config("tiny", overrides={"attack": {"kind": "capture", "clients": [7]}})


def test_trimmed_expert_merge_known_answers():
    """Coordinate-wise trimmed mean and median; per expert, over A(e) only, scaled by A(e)'s weight."""
    from fedalign_moe.core.aggregate import apply_expert_trimmed
    from fedalign_moe.core.robust import trimmed_mean

    x = torch.tensor([[1.0, 10.0], [2.0, 20.0], [3.0, -30.0], [100.0, 40.0]])
    assert trimmed_mean(x, 0.25).tolist() == [2.5, 15.0]
    assert trimmed_mean(x, 0.5).tolist() == [2.5, 15.0] and trimmed_mean(x[:3], 0.5).tolist() == [2.0, 10.0]
    assert trimmed_mean(x[:2], 0.5).tolist() == [1.5, 15.0]  # two values: nothing to cut
    g = torch.zeros(2, 1)
    clients = [torch.tensor([[1.0], [5.0]]), torch.tensor([[2.0], [6.0]]), torch.tensor([[3.0], [7.0]]), torch.tensor([[900.0], [8.0]])]
    w_EC = torch.tensor([[0.25, 0.25, 0.25, 0.25],  # expert 0: all four aligned, one of them hostile
                         [0.0, 0.25, 0.25, 0.0]])  # expert 1: two aligned: the weighted update
    out = apply_expert_trimmed(g, clients, w_EC, 0.25)
    assert out[0].item() == pytest.approx(2.5) and out[1].item() == pytest.approx(0.25 * 6 + 0.25 * 7)


def test_fedalign_expert_trim_resists_a_scaled_expert(server_identity):
    """A reply whose update is 8x its honest one (inside the norm rule's 10x) drags the weighted merge of
    the experts; the trimmed merge (expert_trim = 0.25) moves a small fraction of that."""
    glob = replies.global_state()
    honest_state = replies.perturbed(glob, GOOD)
    scaled = {k: glob[k] + 8 * (v - glob[k]) for k, v in honest_state.items()}
    moved = {}
    for trim in (None, 0.25):
        experts = []
        for state in (honest_state, scaled):
            strategy = _strategy("fedalign", example_counts="claimed")
            strategy.options = strategy.options.model_copy(update={"expert_trim": trim, "consistency_floor": 0.0})
            arrays, _ = _round(strategy, bad_state=state)
            assert not strategy.outcome.dropped and strategy.last.aligned_LEC.all()  # everyone in every A(e)
            experts.append(arrays.to_torch_state_dict()["x"])
        moved[trim] = (experts[1] - experts[0]).abs().max().item()
    assert moved[0.25] < moved[None] / 4, moved


# ---------------------------------------------------------------- the norm clip

def test_the_clip_is_refused_beside_personal_experts():
    with pytest.raises(ValueError, match="clip_update_norm_ratio.*personal_experts"):
        load_config("tiny", overrides={"federation": {"strategy": "fedalign", "clip_update_norm_ratio": 3.0},
                                       "fedalign": {"personal_experts": True}})
    load_config("tiny", overrides={"federation": {"strategy": "fedalign", "clip_update_norm_ratio": 3.0}})


def test_clip_scales_known_answers():
    # paces 1, 1, 2, 9 (median 1.5): at 2x, only the 9 is scaled, to 3
    assert norm_clip_scales(torch.tensor([1.0, 1.0, 2.0, 9.0]), 2.0).tolist() == pytest.approx([1, 1, 1, 3 / 9])
    assert norm_clip_scales(torch.zeros(3), 2.0).tolist() == [1.0, 1.0, 1.0]


def _clip_round(name: str, hostile, **federation):
    """4 honest clients (a shared step and their own noise) and partition 4, whose update is
    ``hostile(honest update)``; partition 4 holds 4 batches (4 local steps, and an honest update twice the
    others': norms grow as the square root of the steps). (strategy after the round, aggregate, the global
    state)."""
    glob = replies.global_state()
    zero = {k: torch.zeros_like(v) for k, v in glob.items()}
    shared = replies.perturbed(zero, 99, 0.01)
    steps = [{k: shared[k] + replies.perturbed(zero, p, 0.003)[k] for k in glob} for p in range(GOOD + 1)]
    steps[GOOD] = {k: hostile(2 * v) for k, v in steps[GOOD].items()}
    strategy = _strategy(name, example_counts="claimed", **federation)
    sent = replies.instructions(strategy, glob, GOOD + 1)
    answers = [replies.reply(sent[p], p, {k: glob[k] + steps[p][k] for k in glob},
                             examples=4 * replies.BATCH if p == GOOD else EXAMPLES) for p in range(GOOD + 1)]
    arrays, _ = strategy.aggregate_train(1, answers)
    return strategy, arrays, glob


@pytest.mark.parametrize("name", ["fedavg", "fedalign", "fedprox", "fedmoe"])
def test_a_scaled_update_is_clipped_to_the_rounds_pace(name, server_identity):
    """``federation.clip_update_norm_ratio = 2``: a 9x update (inside the 10x drop rule) is kept, scaled so
    that its norm per square root of its 4 steps is 2x the round's median; its honest update (twice the
    others' in 4 steps) is left as it is; the aggregate is the one of the clipped reply."""
    honest, _, _ = _clip_round(name, lambda step: step, clip_update_norm_ratio=2.0)
    assert [r.update_scale for r in honest.outcome.used] == [1.0] * (GOOD + 1)
    strategy, arrays, glob = _clip_round(name, lambda step: 9 * step, clip_update_norm_ratio=2.0)
    assert not strategy.outcome.dropped
    hostile = strategy.outcome.used[GOOD]
    norms = strategy.outcome.update_norms
    pace = sorted([norms[p] for p in range(GOOD)] + [norms[GOOD] / 2])  # 1 step each, 4 for partition 4
    median = pace[GOOD // 2]
    assert hostile.update_scale == pytest.approx(2 * median / (norms[GOOD] / 2), rel=1e-6)
    if hostile.sub_moe_LE is None:  # the reply's arrays were replaced by the clipped update: its norm is 2 x 2 x the median
        moved = sum(float((hostile.state()[k] - glob[k]).square().sum()) for k in glob) ** 0.5
        assert moved == pytest.approx(4 * median, rel=1e-5)
    plain, plain_arrays, _ = _clip_round(name, lambda step: 9 * step)
    assert plain.outcome.used[GOOD].update_scale == 1.0
    moved_by = {key: float((a.to_torch_state_dict()["head"] - glob["head"]).norm()) for key, a in
                (("clip", arrays), ("plain", plain_arrays))}
    assert moved_by["clip"] < moved_by["plain"] / 1.5, moved_by


def test_honest_statistics_meet_the_consistency_rules():
    """Statistics computed by the accumulator from random logits, top-1 and top-2, pass the rules."""
    from fedalign_moe.core.statistics import RoutingAccumulator

    g = torch.Generator().manual_seed(0)
    for k in (1, 2, 4):
        acc = RoutingAccumulator(4, 3, k)
        for _ in range(5):
            keep = torch.rand(32, generator=g) > 0.3
            acc.add(torch.randn(32, 4, generator=g) * 3, torch.randn(32, 3, generator=g), torch.randn(4, 3, generator=g), keep)
        s = ModelRoutingStatistics.stack([acc.result()])
        protocol._check_consistency(s.p_LE.double(), s.n_LE.double(), s.o_LE, s.m_LE, s.tokens)


# ---------------------------------------------------------------- no reply ends a run

def test_an_aggregation_that_raises_keeps_the_model_and_the_run(tmp_path, server_identity, monkeypatch):
    from fedalign_moe.federation.server import _Server
    from fedalign_moe.training.setup import open_log, open_workspace

    cfg = load_config("tiny", overrides={"out_dir": str(tmp_path)})
    ws = open_workspace(cfg)
    server = _Server(replies.ScriptedGrid([1, 2, 3], lambda msg: None), ws, open_log(ws), None)  # no node answers
    before = server.arrays.to_torch_state_dict()

    def boom(*args, **kwargs):
        raise RuntimeError("stack expects each tensor to be equal size")

    monkeypatch.setattr(server.strategy, "aggregate_round", boom)
    record, _ = server.train_round(1)
    assert not record.adopted and record.exchange.not_adopted_reason == (
        "the aggregation raised RuntimeError: stack expects each tensor to be equal size")
    assert all(torch.equal(before[k], v) for k, v in server.arrays.to_torch_state_dict().items())


# Hypothesis: replies of any structure, dtype, header, shape and value

_NAMES = ["arrays", "metrics", "fedalign-stats", "config", "fedalign-target", "x", ""]
_SCALARS = st.one_of(st.integers(-2**63, 2**63 - 1), st.floats(allow_nan=True, allow_infinity=True), st.booleans(),
                     st.text(max_size=5), st.binary(max_size=5), st.just(10**39 * 1.0))
_METRIC_VALUES = st.one_of(_SCALARS, st.lists(st.floats(allow_nan=True, allow_infinity=True), max_size=6),
                           st.lists(st.integers(-2**63, 2**63 - 1), max_size=6))
_DTYPES = st.sampled_from(["float32", "float64", "float16", "int64", "bool", "<U1", "O", "complex64", "", "float32 "])
_DESCRS = st.sampled_from(["'<f4'", "'>f4'", "'<f8'", "'|O'", "'<U1'", "('<f4', (2,))", "[('a', '<f4')]", "'<i8'", "'|b1'", "7"])
_SHAPES = st.lists(st.integers(-3, 2**40), max_size=4).map(tuple)  # protobuf carries int64


@st.composite
def _npy(draw):
    """.npy bytes: numpy's own, or a forged header with any descr, order and shape, and any payload."""
    if draw(st.booleans()):
        shape = draw(st.lists(st.integers(0, 6), max_size=3))
        values = st.floats(width=16) if draw(st.booleans()) else st.integers(-5, 5)  # float16 holds them all
        arr = np.asarray(draw(st.lists(values, min_size=math.prod(shape), max_size=math.prod(shape))),
                         dtype=draw(st.sampled_from([np.float32, np.float64, np.float16]))).reshape(shape)
        return Array(arr).data
    header = f"{{'descr': {draw(_DESCRS)}, 'fortran_order': {draw(st.booleans())}, 'shape': {draw(_SHAPES)!r}, }}"
    header += " " * draw(st.integers(0, 70)) + "\n"
    magic = draw(st.sampled_from([b"\x93NUMPY\x01\x00", b"\x93NUMPY\x02\x00", b"\x93NUMPY\x03\x00", b"NUMPY"]))
    length = len(header).to_bytes(2 if magic.endswith(b"\x01\x00") else 4, "little")
    return magic + length + header.encode("latin1") + draw(st.binary(max_size=200))


@st.composite
def _forged_array(draw, like: Array | None):
    dtype = draw(st.one_of(_DTYPES, st.just(like.dtype) if like else _DTYPES))
    shape = draw(st.one_of(_SHAPES, st.just(tuple(like.shape)) if like else _SHAPES))
    stype = draw(st.sampled_from(["numpy.ndarray", "numpy.ndarray", "torch.Tensor", ""]))
    return Array(dtype=dtype, shape=tuple(shape), stype=stype, data=draw(_npy()))


@st.composite
def _mutation(draw):
    """One change to a reply's content: (what, function of the content)."""
    kind = draw(st.sampled_from(["drop-record", "record-type", "metric", "array", "add-array", "drop-array"]))
    name = draw(st.sampled_from(_NAMES))
    if kind == "drop-record":
        return kind, lambda c: c.pop(name, None)
    if kind == "record-type":
        rec = draw(st.sampled_from([ConfigRecord({"a": 1}), MetricRecord({"num-examples": 5}), ArrayRecord()]))
        return kind, lambda c: c.__setitem__(name or "arrays", rec)
    if kind == "metric":
        key = draw(st.sampled_from([*protocol._REQUIRED_METRICS, protocol.REG_LOSS, protocol.SUB_MOE, "weight"]))
        value = draw(_METRIC_VALUES)

        def set_metric(c):
            if isinstance(c.get(protocol.METRICS), MetricRecord):
                try:
                    c[protocol.METRICS][key] = value
                except (TypeError, ValueError):  # Flower's own record refuses it: nothing to send
                    pass
        return kind, set_metric
    record = draw(st.sampled_from([protocol.ARRAYS, protocol.FEDALIGN_STATS]))
    target = draw(st.sampled_from(["r", "x", "head", "o", "m", "mu", "new"]))
    forged = draw(_forged_array(None)) if kind != "drop-array" else None
    keep_description = draw(st.booleans())

    def change_array(c):
        rec = c.get(record)
        if not isinstance(rec, ArrayRecord):
            return
        arrays = dict(rec.items())
        if kind == "drop-array":
            arrays.pop(target, None)
        else:
            old = arrays.get(target)
            arrays[target] = (Array(dtype=old.dtype, shape=tuple(old.shape), stype=old.stype, data=forged.data)
                              if old is not None and keep_description else forged)
        c[record] = ArrayRecord(arrays)
    return kind, change_array


@pytest.mark.parametrize("name", STRATEGIES)
@given(mutations=st.lists(_mutation(), min_size=1, max_size=3))
def test_no_reply_ends_the_round_or_sneaks_in(name, mutations, server_identity):
    """Whatever the hostile reply holds, no exception escapes, and either it is dropped and named, and the
    new model is what the honest replies used give on their own (a hostile claim of an honest partition
    costs both replies, as documented), or it is used as a valid reply and every weight is finite."""
    strategy = _strategy(name)

    def hostile(content):
        for _, change in mutations:
            change(content)

    arrays, node = _round(strategy, bad=hostile)
    used = [r.partition_id for r in strategy.outcome.used]
    if GOOD in used:
        event("used")
        assert all(torch.isfinite(t).all() for t in arrays.to_torch_state_dict().values())
        return
    reason = next((f.reason for f in strategy.outcome.dropped if f.node_id == node), "")
    event("dropped: " + re.sub(r"\d[\d.e+-]*", "N", re.split(r"[\[(]", reason)[0]).strip()[:70])  # the reason's class
    assert node in [f.node_id for f in strategy.outcome.dropped] and all(f.reason for f in strategy.outcome.dropped)
    alone = _strategy(name)
    glob = replies.global_state()
    sent = replies.instructions(alone, glob, GOOD + 1)
    expected, _ = alone.aggregate_train(1, [replies.reply(sent[p], p, replies.perturbed(glob, p)) for p in used])
    assert (arrays is None and not used) or _same(arrays, expected)
