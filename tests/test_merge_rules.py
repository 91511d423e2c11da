"""Issue 36's merge rules [ours] against hand-computed sets and weights: a majority floor on the aligned set,
and soft selection by consistency; the paper's set, with neither, is unchanged."""

import torch

from fedalign_moe.core.semantic_alignment import align_expert_gram, soft_selection, with_majority


def _setup():
    """Four clients: 0 and 1 share a role and an update direction, 2 shares the role less and the direction
    little, 3 routes the same expert for another role (its mean input points elsewhere) and moves it
    orthogonally: c = [0.3811, 0.4119, 0.1329, 0.0000] (mean 0.2315)."""
    mu_CH = torch.tensor([[1.0, 0.0], [1.0, 0.1], [1.0, 0.8], [-1.0, 0.3]])
    delta_CP = torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.1, 0.0], [0.2, 1.0, 0.0], [0.0, 0.0, 1.0]]).double()
    return mu_CH, delta_CP @ delta_CP.T, torch.tensor([10.0, 10.0, 10.0, 10.0])


def test_the_majority_floor_adds_the_most_consistent_left_out_clients():
    aligned = torch.tensor([True, False, False, False])
    c = torch.tensor([0.9, 0.2, 0.5, -0.1])
    active = torch.tensor([True, True, True, True])
    assert with_majority(aligned, c, active, 0.5).tolist() == [True, False, True, False]  # 2 of 4, by c
    assert with_majority(aligned, c, active, 0.75).tolist() == [True, True, True, False]
    assert with_majority(aligned, c, torch.tensor([True, True, False, True]), 0.6).tolist() == [True, True, False, False]
    assert with_majority(aligned, c, active, 0.25).tolist() == aligned.tolist()  # already enough


def test_soft_selection_scales_by_consistency_and_drops_other_roles():
    s = soft_selection(torch.tensor([0.8, 0.4, -0.2, 0.6]), torch.tensor([True, True, True, False]))
    assert torch.allclose(s, torch.tensor([1.0, 0.5, 0.0, 0.0], dtype=torch.float64))
    assert soft_selection(torch.tensor([-0.1, 0.0]), torch.tensor([True, True])).tolist() == [0.0, 0.0]


def test_the_rules_on_one_expert():
    mu_CH, gram_CC, n_C = _setup()
    strict = align_expert_gram(mu_CH, gram_CC, n_C, beta=0.0)  # the paper's rule at beta 0: c >= mean
    assert torch.allclose(strict.c_C, torch.tensor([0.3811, 0.4119, 0.1329, 0.0], dtype=torch.float64), atol=1e-4)
    assert strict.aligned_C.tolist() == [True, True, False, False]
    assert strict.selection_C.tolist() == [1.0, 1.0, 0.0, 0.0]
    majority = align_expert_gram(mu_CH, gram_CC, n_C, beta=0.0, min_share=0.75)  # 3 of 4, client 2 next by c
    assert majority.aligned_C.tolist() == [True, True, True, False]
    assert torch.allclose(majority.weights_C, torch.tensor([1 / 3, 1 / 3, 1 / 3, 0.0], dtype=torch.float64))
    soft = align_expert_gram(mu_CH, gram_CC, n_C, beta=0.0, soft=True)  # s = c / 0.4119: 0.925, 1, 0.323, 0
    s = torch.tensor([0.3811 / 0.4119, 1.0, 0.1329 / 0.4119, 0.0], dtype=torch.float64)
    assert soft.aligned_C.tolist() == [True, True, True, False]
    assert torch.allclose(soft.weights_C, s / s.sum(), atol=1e-4)


def test_the_options_reach_the_aggregate(server_identity):
    """Through the strategy: a majority floor keeps every client in a round where the threshold kept fewer."""
    import replies

    glob = replies.global_state()
    base = replies.strategy("fedalign", 4)
    floor = replies.strategy("fedalign", 4)
    floor.options = floor.options.model_copy(update={"min_aligned_share": 1.0})
    for s in (base, floor):
        sent = replies.instructions(s, glob, 4)
        trained = [replies.perturbed(glob, seed, 0.1) for seed in range(4)]
        s.aggregate_train(1, [replies.reply(m, i, u) for i, (m, u) in enumerate(zip(sent, trained))])
    assert floor.last.aligned_LEC.all() and not base.last.aligned_LEC.all()


def test_routed_weights_do_not_let_clients_that_never_use_an_expert_shrink_its_step(server_identity):
    """Client 3 routes no token to expert 0: with "examples" weights expert 0 moves by the aligned clients'
    share of all the data, with "routed" by their share of the data of the clients that routed to it
    (here 4/3 the step); experts every client routes to move the same either way."""
    import replies

    glob = replies.global_state()
    trained = [replies.perturbed(glob, seed, 0.1) for seed in range(4)]
    counts = [[10.0, 10.0, 10.0, 10.0]] * 3 + [[0.0, 20.0, 10.0, 10.0]]
    moved = {}
    for weights in ("examples", "routed"):
        s = replies.strategy("fedalign", 4)
        s.options = s.options.model_copy(update={"expert_weights": weights, "consistency_floor": -1.0})  # A(e): all routing
        sent = replies.instructions(s, glob, 4)
        arrays, _ = s.aggregate_train(1, [replies.reply(m, i, u, stats=replies.routing(counts[i]))
                                          for i, (m, u) in enumerate(zip(sent, trained))])
        assert s.outcome.dropped == []
        moved[weights] = arrays.to_torch_state_dict()["x"] - glob["x"]
    assert torch.allclose(moved["routed"][0], moved["examples"][0] * 4 / 3, atol=1e-6)
    assert torch.allclose(moved["routed"][1:], moved["examples"][1:], atol=1e-6)
