"""FedAlign-MoE's aggregation and strategy on hand-built replies (its run through Flower: test_resume.py)."""

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg

import replies
from fedalign_moe.config import load_config
from fedalign_moe.core.aggregate import LayerNames, fedalign_aggregate
from fedalign_moe.core.statistics import RoundRoutingStatistics
from fedalign_moe.federation import protocol
from fedalign_moe.federation.strategies import make_strategy
from fedalign_moe.models.base import MoELayerLayout, MoELayout
from reference_aggregate import spec_options

C, E, H, I = 3, 3, 4, 5
LAYOUT = MoELayout(E, 1, (MoELayerLayout(0, "router", ("experts.up", "experts.down")),))
LAYERS = [LayerNames("router", ("experts.up", "experts.down"))]


def _global():
    g = torch.Generator().manual_seed(0)
    return {"router": torch.randn(E, H, generator=g), "experts.up": torch.randn(E, I, H, generator=g),
            "experts.down": torch.randn(E, H, I, generator=g), "head": torch.randn(2, H, generator=g)}


def _stats(n_CE=None, mu_CEH=None):
    n = n_CE if n_CE is not None else torch.full((C, E), 5.0)
    return RoundRoutingStatistics(torch.full((C, 1, E), 1.0 / E), n[:, None], torch.full((C, 1, E), 0.5),
                                  torch.full((C, 1, E), 0.2), (mu_CEH if mu_CEH is not None else torch.ones(C, E, H))[:, None])


def _perturbed(base, scale, seed):
    g = torch.Generator().manual_seed(seed)
    return {k: v + scale * torch.randn(v.shape, generator=g) for k, v in base.items()}


def test_identical_clients_give_the_fedavg_model():
    glob = _global()
    client = _perturbed(glob, 0.1, 1)
    res = fedalign_aggregate(glob, [client] * C, torch.tensor([1.0, 2.0, 3.0]), _stats(), LAYERS, spec_options())
    for name in glob:
        assert torch.allclose(res.state[name], client[name], atol=1e-6), name
    assert res.aligned_LEC.all()


def test_fedavg_switches_reproduce_fedavg_exactly():
    glob = _global()
    clients = [_perturbed(glob, 0.1, s) for s in range(C)]
    examples = torch.tensor([10.0, 30.0, 60.0])
    res = fedalign_aggregate(glob, clients, examples, _stats(), LAYERS,
                             spec_options(gate_aggregation="fedavg", adaptive_alpha=False, expert_aggregation="fedavg"))
    for name in glob:
        expected = sum(w * c[name] for w, c in zip([0.1, 0.3, 0.6], clients))
        assert torch.allclose(res.state[name], expected, atol=1e-6), name


def test_opposing_client_does_not_move_that_expert_but_others_take_its_update():
    glob = _global()
    direction = {k: torch.ones_like(v) for k, v in glob.items()}
    clients = [{k: glob[k] + 0.1 * direction[k] for k in glob} for _ in range(C)]
    clients[1] = {k: v + 0.01 * torch.randn(v.shape) for k, v in clients[1].items()}
    mu = torch.ones(C, E, H)
    # client 2's copy of expert 0 plays the opposite role and moves the opposite way
    mu[2, 0] = -1.0
    for name in ("experts.up", "experts.down"):
        clients[2][name][0] = glob[name][0] - 0.1
    res = fedalign_aggregate(glob, clients, torch.ones(C), _stats(mu_CEH=mu), LAYERS, spec_options(consistency_floor=0.5))
    assert res.aligned_LEC[0, 0].tolist() == [True, True, False]
    for name in ("experts.up", "experts.down"):
        # expert 0 moved only by clients 0 and 1, each by its FedAvg share (1/3, equal examples); client 2's
        # share keeps the global value (expert_weights = examples, the default)
        moved = sum(clients[c][name][0] - glob[name][0] for c in (0, 1)) / 3
        assert torch.allclose(res.state[name][0], glob[name][0] + moved, atol=1e-6)
        # experts 1 and 2 still take client 2's update
        assert res.aligned_LEC[0, 1:].all()
        assert torch.allclose(res.state[name][1], sum(c[name][1] for c in clients) / 3, atol=1e-6)


def test_without_a_floor_mean_minus_std_drops_an_agreeing_client_by_noise():
    """The spec's rule alone: when all clients agree, the least consistent one still falls below tau."""
    glob = _global()
    clients = [{k: v + 0.1 for k, v in glob.items()} for _ in range(C)]
    clients[1] = {k: v + 0.01 * torch.randn(v.shape, generator=torch.Generator().manual_seed(0)) for k, v in clients[1].items()}
    spec_only = fedalign_aggregate(glob, clients, torch.ones(C), _stats(), LAYERS, spec_options())
    assert not spec_only.aligned_LEC[0, :, 1].any()
    with_floor = fedalign_aggregate(glob, clients, torch.ones(C), _stats(), LAYERS, spec_options(consistency_floor=0.5))
    assert with_floor.aligned_LEC.all()


def test_expert_that_no_client_routed_to_is_unchanged():
    glob = _global()
    clients = [_perturbed(glob, 0.1, s) for s in range(C)]
    n = torch.full((C, E), 5.0)
    n[:, 2] = 0
    res = fedalign_aggregate(glob, clients, torch.ones(C), _stats(n_CE=n), LAYERS, spec_options())
    for name in ("experts.up", "experts.down"):
        assert torch.equal(res.state[name][2], glob[name][2])
        assert not torch.equal(res.state[name][0], glob[name][0])


def test_strategy_matches_flower_fedavg_on_identical_clients(server_identity):
    cfg = load_config("tiny", overrides={"federation": {"strategy": "fedalign"}, "fedalign": {"reg_lambda": 0.0}})
    strategy = make_strategy(cfg, replies.LAYOUT)
    glob = replies.global_state()
    client = replies.perturbed(glob, 3)
    sent = replies.instructions(strategy, glob, 3)
    target = protocol.read_instruction(sent[0].content).alignment
    assert target.reg_lambda == 0.0 and torch.allclose(target.p_g_LE, torch.full((1, 4), 0.25))
    answers = [replies.reply(m, pid, client) for pid, m in enumerate(sent)]
    ours, _ = strategy.aggregate_train(1, answers)
    plain = [Message(content=RecordDict({protocol.ARRAYS: ArrayRecord(client),
                                         protocol.METRICS: MetricRecord({protocol.NUM_EXAMPLES: 10})}), reply_to=m) for m in sent]
    theirs, _ = FedAvg().aggregate_train(1, plain)
    for name, value in theirs.to_torch_state_dict().items():
        assert torch.allclose(ours.to_torch_state_dict()[name], value, atol=1e-6)
    diag = strategy.diagnostics()
    assert diag["clients"] == [0, 1, 2] and len(diag["aligned"][0]) == 4
    # the next round sends the new p_g, and a checkpoint restores it
    state = strategy.state_dict()
    fresh = make_strategy(cfg, replies.LAYOUT)
    fresh.load_state_dict(state)
    assert torch.equal(fresh.p_g_LE, strategy.p_g_LE) and torch.equal(fresh.alpha_LE, strategy.alpha_LE)


def test_ablation_rungs_switch_components():
    cfg = load_config("tiny", overrides={"federation": {"strategy": "fedalign-uniform"}})
    eff = cfg.effective_fedalign()
    assert eff.gate_aggregation == "uniform" and not eff.adaptive_alpha and eff.expert_aggregation == "fedavg"
    full = load_config("tiny", overrides={"federation": {"strategy": "fedalign"}, "fedalign": {"beta": 2.0}}).effective_fedalign()
    assert full.expert_aggregation == "semantic" and full.adaptive_alpha and full.beta == 2.0


def test_routing_statistics_and_their_noise():
    from fedalign_moe.config import ModelConfig
    from fedalign_moe.models.build import build_model
    from fedalign_moe.training.alignment import ClientAligner, RoutingObserver

    built = build_model(ModelConfig(backbone="tiny-mixtral"), ["a", "b"], "classification", 0)
    ids = torch.randint(5, 500, (4, 6), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    L, E = 2, 4
    clean = ClientAligner(built.adapter, torch.full((L, E), 0.25), torch.ones(L, E), 0.1)
    noisy = ClientAligner(built.adapter, torch.full((L, E), 0.25), torch.ones(L, E), 0.1, stats_noise_sigma=0.5, seed=1)
    observer = RoutingObserver(built.adapter)
    with built.adapter.recorder() as rec:
        built.model(ids, mask)
    keep = mask.reshape(-1).bool()
    observer.observe(rec.records, keep)
    a, b = clean.upload(observer.result()), noisy.upload(observer.result())
    assert a.tokens == 24 and a.n_LE.sum(-1).tolist() == [48.0, 48.0]  # 24 tokens x top-2 per layer
    assert torch.allclose(a.p_LE.sum(-1), torch.ones(L)) and torch.allclose(b.p_LE.sum(-1), torch.ones(L))
    assert not torch.allclose(a.mu_LEH, b.mu_LEH) and not torch.allclose(a.p_LE, b.p_LE)
    for t in (b.o_LE, b.m_LE):
        assert t.min() >= 0 and t.max() <= 1
    assert b.n_LE.min() >= 0 and b.n_LE.max() <= 24 and torch.equal(b.n_LE, b.n_LE.round())
    # the global routers as received agree with themselves: overlap 1 wherever an expert was chosen
    assert torch.all((a.o_LE == 1) | (a.n_LE == 0))
    # a second forward through the loss adds lambda * regulariser with gradient to the routers only
    with built.adapter.recorder() as rec:
        built.model(ids, mask)
    reg = clean.loss(rec.records, keep)
    reg.backward()
    assert built.adapter.router_weight(0).grad is not None
    assert all(p.grad is None for n, p in built.model.named_parameters() if "experts" in n)


# ------------------------------------------------ the float32 streaming aggregation against the float64 reference

def _grid_case(seed: int, C: int = 6):
    """Two MoE layers, clients in two camps per expert (so aligned sets are neither empty nor everyone),
    routing statistics that vary by client, a non-MoE tensor and uneven example counts."""
    g = torch.Generator().manual_seed(seed)
    L, E, H, I = 2, 4, 8, 6
    glob = {"head": torch.randn(3, H, generator=g)}
    layers = []
    for l in range(L):
        glob[f"r{l}"] = torch.randn(E, H, generator=g)
        glob[f"u{l}"], glob[f"d{l}"] = torch.randn(E, I, H, generator=g), torch.randn(E, H, I, generator=g)
        layers.append(LayerNames(f"r{l}", (f"u{l}", f"d{l}")))
    camp_E = {k: torch.randn(v.shape, generator=g) for k, v in glob.items()}
    clients = []
    for c in range(C):
        sign = 1.0 if c % 3 else -1.0  # a third of the clients pull the other way
        clients.append({k: v + 0.05 * sign * camp_E[k] + 0.02 * torch.randn(v.shape, generator=g) for k, v in glob.items()})
    p = torch.rand(C, L, E, generator=g) + 0.1
    stats = RoundRoutingStatistics(p / p.sum(-1, keepdim=True), torch.randint(0, 30, (C, L, E), generator=g).float(),
                                   torch.rand(C, L, E, generator=g), torch.rand(C, L, E, generator=g),
                                   torch.randn(C, L, E, H, generator=g))
    examples = torch.randint(5, 50, (C,), generator=g).float()
    return glob, clients, examples, stats, layers


@pytest.mark.parametrize("opts", [spec_options(), spec_options(consistency_floor=0.5), spec_options(beta=0.3),
                                  spec_options(expert_aggregation="fedavg"), spec_options(gate_aggregation="uniform"),
                                  spec_options(gate_aggregation="fedavg", adaptive_alpha=False, omega_times_tokens=True),
                                  spec_options(expert_weights="tokens")])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_streaming_aggregation_equals_the_float64_reference(opts, seed):
    import reference_aggregate

    glob, clients, examples, stats, layers = _grid_case(seed)
    ref = reference_aggregate.fedalign_aggregate(glob, clients, examples, stats, layers, opts)
    res = fedalign_aggregate(glob, clients, examples, stats, layers, opts)
    assert set(res.state) == set(ref.state)
    for name in ref.state:
        torch.testing.assert_close(res.state[name], ref.state[name], rtol=1e-5, atol=1e-6)
    assert torch.equal(res.aligned_LEC, ref.aligned_LEC)
    assert 0 < int(res.aligned_LEC.sum()) < res.aligned_LEC.numel() or opts.expert_aggregation == "fedavg"
    torch.testing.assert_close(res.tau_LE, ref.tau_LE, equal_nan=True)
    for t in ("p_g_LE", "alpha_LE", "omega_LCE"):
        torch.testing.assert_close(getattr(res, t), getattr(ref, t))


def test_clients_read_lazily_give_the_same_state_and_the_global_is_untouched():
    glob, clients, examples, stats, layers = _grid_case(5)
    before = {k: v.clone() for k, v in glob.items()}
    eager = fedalign_aggregate(glob, clients, examples, stats, layers, spec_options())
    lazy = fedalign_aggregate(glob, [protocol.ArrayView(ArrayRecord(c))
                                     for c in clients], examples, stats, layers, spec_options())
    for name in eager.state:
        assert torch.equal(lazy.state[name], eager.state[name])
    for name in glob:
        assert torch.equal(glob[name], before[name])


def test_gram_matrices_taken_in_slices_equal_the_whole_ones():
    from fedalign_moe.core.aggregate import expert_gram

    glob, clients, *_ = _grid_case(3)
    whole = expert_gram(["u0", "d0"], glob, clients)
    for floats in (1, 7, 4 * 6 * 5, 10_000):  # a column at a time, odd slices, one expert row, everything
        torch.testing.assert_close(expert_gram(["u0", "d0"], glob, clients, buffer_floats=floats), whole)
    deltas = [torch.cat([(c[n] - glob[n]).reshape(4, -1) for n in ("u0", "d0")], 1) for c in clients]
    exact = torch.stack([torch.stack([(deltas[i].double() * deltas[j].double()).sum(1) for j in range(6)], 1)
                         for i in range(6)], 1)  # [E, C, C]
    torch.testing.assert_close(whole, exact, rtol=1e-5, atol=1e-8)


def test_when_no_expert_tensor_travels_the_diagnostics_say_not_applied(server_identity, tmp_path):
    """Frozen experts that do not travel (and no LoRA factors on them): semantic expert aggregation has
    nothing to act on. Its aligned sets read empty (0 merged) before: now "not applied"."""
    from fedalign_moe.report.diagnostics import draw_fedalign
    from fedalign_moe.report.evidence import aligned_fraction, alignment_summary
    from fedalign_moe.tracking import TensorBoardTracker

    cfg = load_config("tiny", overrides={"federation": {"strategy": "fedalign"}})
    strategy = make_strategy(cfg, replies.LAYOUT)
    glob = {k: v for k, v in replies.global_state().items() if k != "x"}  # the router and the head travel
    sent = replies.instructions(strategy, glob, 3)
    answers = [replies.reply(m, pid, replies.perturbed(glob, pid)) for pid, m in enumerate(sent)]
    arrays, _ = strategy.aggregate_train(1, answers)
    assert arrays is not None and not strategy.last.experts_applied_L.any()
    diag = {"round": 1, **strategy.diagnostics()}
    assert diag["aligned"] == ["not applied"]
    assert aligned_fraction([diag], 3) == []  # not a 0 that reads as "nobody merged"
    assert np.isnan(alignment_summary([diag], 3)["merged"])
    assert [p.name for p in draw_fedalign([diag], tmp_path)][:2] == ["fedalign_omega.png", "fedalign_aligned.png"]
    tracker = TensorBoardTracker(tmp_path / "tb")
    tracker.diagnostics(diag)  # skips the layer instead of counting the letters of "not applied"
    tracker.close()


def test_the_diagnostics_name_who_routed_to_each_expert_and_the_report_counts_the_cut(server_identity):
    """An aligned set leaves out two kinds of client: those that sent expert e no token (no update of e to
    lose) and those the threshold cut. The diagnostics record the first (``routed``), and the report's
    "cut with tokens" counts only the second."""
    from fedalign_moe.report.evidence import alignment_summary

    cfg = load_config("tiny", overrides={"federation": {"strategy": "fedalign"}})
    strategy = make_strategy(cfg, replies.LAYOUT)
    glob = replies.global_state()
    sent = replies.instructions(strategy, glob, 3)
    counts = [[10.0, 0.0, 10.0, 20.0], [0.0, 0.0, 20.0, 20.0], [10.0, 10.0, 0.0, 20.0]]  # client 2 alone on expert 1
    answers = [replies.reply(m, pid, replies.perturbed(glob, pid), stats=replies.routing(counts[pid]))
               for pid, m in enumerate(sent)]
    strategy.aggregate_train(1, answers)
    diag = strategy.diagnostics()
    assert diag["routed"] == [[[0, 2], [2], [0, 1], [0, 1, 2]]]
    assert all(set(a) <= set(r) for a, r in zip(diag["aligned"][0], diag["routed"][0]))
    # known answer: 4 clients; expert 0: routed by 0, 1, 2, aligned 0, 1 -> 1 cut; expert 1: routed by 3 only,
    # aligned nobody -> 1 cut; expert 2: routed by nobody -> 0; a "not applied" layer counts nothing
    hand = {"clients": [0, 1, 2, 3], "aligned": [[[0, 1], [], []], "not applied"],
            "routed": [[[0, 1, 2], [3], []], [[0], [1], [2]]]}
    assert alignment_summary([hand], 4)["cut"] == pytest.approx((1 / 4 + 1 / 4 + 0) / 3)
    assert np.isnan(alignment_summary([{"clients": [0], "aligned": [[[0]]]}], 1)["cut"])  # runs from before


def test_expert_weights_by_tokens_or_by_examples_known_answer():
    """Aligned set {0, 2} of three clients. "tokens": n over A(e), summing to 1 (the spec's [ours] rule);
    "examples": FedAvg's weights N_i / N inside A(e), the left-out client's share dropped, not redistributed."""
    from fedalign_moe.core.semantic_alignment import aligned_weights

    aligned_C = torch.tensor([True, False, True])
    n_C, examples_C = torch.tensor([1.0, 5.0, 3.0]), torch.tensor([10.0, 30.0, 60.0])
    assert aligned_weights(aligned_C, n_C, renormalise=True).tolist() == pytest.approx([0.25, 0.0, 0.75])
    assert aligned_weights(aligned_C, examples_C, renormalise=False).tolist() == pytest.approx([0.1, 0.0, 0.6])
    assert aligned_weights(torch.zeros(3, dtype=torch.bool), n_C, renormalise=True).tolist() == [0.0, 0.0, 0.0]


def test_example_weights_move_an_expert_one_client_routes_to_as_far_as_fedavg_does():
    """Expert 2 is routed to by client 0 alone. With "tokens" the global expert takes client 0's whole update
    (its own, locally drifted copy: on `specialised` this made the round-2 global model 9 points worse than
    FedAvg's, on validation); with "examples" it moves by client 0's FedAvg share, as under FedAvg."""
    glob = _global()
    clients = [_perturbed(glob, 0.1, s) for s in range(C)]
    examples = torch.tensor([10.0, 30.0, 60.0])
    n = torch.full((C, E), 5.0)
    n[1:, 2] = 0
    by_tokens = fedalign_aggregate(glob, clients, examples, _stats(n_CE=n), LAYERS,
                                   spec_options(expert_weights="tokens"))
    by_examples = fedalign_aggregate(glob, clients, examples, _stats(n_CE=n), LAYERS, spec_options())  # the default
    for name in ("experts.up", "experts.down"):
        assert torch.allclose(by_tokens.state[name][2], clients[0][name][2], atol=1e-6)
        assert torch.allclose(by_examples.state[name][2], glob[name][2] + 0.1 * (clients[0][name][2] - glob[name][2]),
                              atol=1e-6)
    # everyone aligned and routing: "examples" is FedAvg on the experts
    everyone = fedalign_aggregate(glob, clients, examples, _stats(), LAYERS,
                                  spec_options(expert_weights="examples", consistency_floor=-1.0))
    assert everyone.aligned_LEC.all()
    for name in ("experts.up", "experts.down"):
        assert torch.allclose(everyone.state[name], sum(w * c[name] for w, c in zip([0.1, 0.3, 0.6], clients)), atol=1e-6)


def test_the_strategy_applies_example_weights_by_default(server_identity):
    """`examples` is the default (issue 9's validation runs): no override here."""
    cfg = load_config("tiny", overrides={"federation": {"strategy": "fedalign"}})
    strategy = make_strategy(cfg, replies.LAYOUT)
    glob = replies.global_state()
    sent = replies.instructions(strategy, glob, 3)
    counts = [[10.0, 10.0, 10.0, 10.0], [20.0, 20.0, 0.0, 0.0], [0.0, 20.0, 0.0, 20.0]]  # expert 2: client 0 only
    states = [replies.perturbed(glob, pid) for pid in range(3)]
    answers = [replies.reply(m, pid, states[pid], stats=replies.routing(counts[pid])) for pid, m in enumerate(sent)]
    arrays, _ = strategy.aggregate_train(1, answers)
    aligned_EC = strategy.last.aligned_LEC[0]
    for e in range(4):  # every client sent 10 examples: FedAvg's weight 1/3 for each aligned client
        expected = glob["x"][e] + sum((states[c]["x"][e] - glob["x"][e]) / 3 for c in range(3) if aligned_EC[e, c])
        assert torch.allclose(arrays.to_torch_state_dict()["x"][e], expected, atol=1e-6), e
