"""The FedMoE baseline's sub-MoE choice and module-wise aggregation on hand-built cases."""

import torch

from fedalign_moe.core.aggregate import LayerNames
from fedalign_moe.core.fedmoe import fedmoe_aggregate, sub_moe


def test_sub_moe_covers_the_requested_share_with_the_fewest_experts():
    n = torch.tensor([50.0, 30.0, 15.0, 5.0])
    assert sub_moe(n, 0.8, top_k=1).tolist() == [True, True, False, False]
    assert sub_moe(n, 0.9, top_k=1).tolist() == [True, True, True, False]
    assert sub_moe(n, 0.4, top_k=2).tolist() == [True, True, False, False]  # at least k
    assert not sub_moe(torch.zeros(4), 0.9, top_k=1).any()
    assert sub_moe(torch.tensor([10.0, 40.0, 40.0, 10.0]), 0.4, top_k=1).tolist() == [False, True, False, False]  # tie: lower index


def test_module_wise_aggregation():
    glob = {"r": torch.zeros(3, 2), "x": torch.zeros(3, 4), "head": torch.zeros(2)}
    c0 = {"r": torch.ones(3, 2), "x": torch.ones(3, 4), "head": torch.ones(2)}
    c1 = {"r": 3 * torch.ones(3, 2), "x": 3 * torch.ones(3, 4), "head": 3 * torch.ones(2)}
    # client 0 uses experts 0 and 1; client 1 uses expert 0 only; nobody uses expert 2
    n = torch.tensor([[[10.0, 10.0, 0.0]], [[30.0, 0.0, 0.0]]])
    state, held = fedmoe_aggregate(glob, [c0, c1], torch.tensor([1.0, 3.0]), n, [LayerNames("r", ("x",))], 0.9, 1)
    assert held[:, 0].tolist() == [[True, True, False], [True, False, False]]
    for name in ("r", "x"):
        assert torch.allclose(state[name][0], torch.full_like(state[name][0], (10 * 1 + 30 * 3) / 40))
        assert torch.allclose(state[name][1], torch.ones_like(state[name][1]))  # client 0 alone
        assert torch.equal(state[name][2], glob[name][2])  # held by nobody: unchanged
    assert torch.allclose(state["head"], torch.full((2,), 2.5))  # FedAvg by examples (1:3)
