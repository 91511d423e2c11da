"""LoRA factors of stacked experts follow their expert through FedAlign-MoE's expert aggregation (issue 10,
section 2): views checked against peft itself, the product Gram against dense products, decisions on
hand-built replies, and a federated run on a transformers family."""

import json

import pytest
import torch

from fedalign_moe.config import FedAlignConfig, ModelConfig, load_config
from fedalign_moe.core.aggregate import LayerNames, fedalign_aggregate
from fedalign_moe.core.lora_experts import a_view, b_view, fold_a, fold_b, product_gram
from fedalign_moe.core.statistics import RoundRoutingStatistics
from fedalign_moe.models.build import build_model
from in_process import run_in_process

E, R, I, O, C = 3, 2, 5, 4, 3


def test_the_views_select_exactly_the_factors_peft_gives_expert_e():
    from peft.tuners.lora.layer import ParamWrapper

    built = build_model(ModelConfig(backbone="tiny-mixtral", num_experts=E, trainable="lora-experts", lora_rank=R),
                        ["a", "b"], "classification", 0)
    wrapper = next(m for m in built.model.modules() if isinstance(m, ParamWrapper))
    A, B = wrapper.lora_A["default"].weight, wrapper.lora_B["default"].weight
    with torch.no_grad():
        A.zero_(), B.zero_()
        a_view(A, E)[1].normal_()
        b_view(B, E)[1].normal_()
        delta = wrapper.get_delta_weight("default")  # [E, ...] as peft adds it to the stacked tensor
    assert delta[0].abs().max() == 0 and delta[2].abs().max() == 0 and delta[1].abs().max() > 0
    product = (b_view(B, E)[1] @ a_view(A, E)[1]).detach() * wrapper.scaling["default"]
    assert torch.allclose(delta[1], product) or torch.allclose(delta[1], product.T)
    # the layout names every factor pair, A first
    layer = built.layout.layers[0]
    assert len(layer.lora) == 2 and all(".lora_A." in a and ".lora_B." in b for a, b in layer.lora)


def test_views_fold_back_to_the_same_tensors():
    A, B = torch.randn(E * R, I), torch.randn(O, R * E)
    assert torch.equal(fold_a(a_view(A, E)), A) and torch.equal(fold_b(b_view(B, E)), B)
    assert torch.equal(b_view(B, E)[2][:, 1], B[:, 1 * E + 2])  # column k*E + e is B_e[:, k]


def _factors(seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return {"A": scale * torch.randn(E * R, I, generator=g), "B": scale * torch.randn(O, R * E, generator=g)}


def test_product_gram_equals_the_dense_products():
    glob, clients = _factors(0), [_factors(s) for s in (1, 2, 3)]

    def product(s, e):
        return b_view(s["B"], E)[e].double() @ a_view(s["A"], E)[e].double()

    gram = product_gram([("A", "B")], glob, clients, E)
    for e in range(E):
        d = [(product(c, e) - product(glob, e)).flatten() for c in clients]
        want = torch.stack([torch.stack([d[i] @ d[j] for j in range(C)]) for i in range(C)])
        torch.testing.assert_close(gram[e], want)


def _stats():
    return RoundRoutingStatistics(torch.full((C, 1, E), 1.0 / E), torch.full((C, 1, E), 5.0), torch.full((C, 1, E), 0.5),
                                  torch.full((C, 1, E), 0.2), torch.ones(C, 1, E, 6))


@pytest.mark.parametrize("direction", ["product", "factors"])
def test_a_client_whose_expert_moves_the_other_way_is_left_out_of_that_expert_only(direction):
    """Clients 0 and 1 move expert 0's B one way, client 2 the opposite way; on experts 1 and 2 all agree.
    Expert 0's factors move by clients 0 and 1's FedAvg shares (1/3 each; client 2's share keeps the global
    value: expert_weights = examples); experts 1 and 2 take all three."""
    glob = {**_factors(0), "router": torch.randn(E, 6), "head": torch.randn(2)}
    g = torch.Generator().manual_seed(5)
    common_OR = {e: torch.randn(O, R, generator=g) for e in range(E)}
    clients = []
    for c in range(C):
        state = {k: v.clone() for k, v in glob.items()}
        B_EOr = b_view(state["B"], E)
        for e in range(E):
            sign = -1.0 if (e == 0 and c == 2) else 1.0
            B_EOr[e] += sign * common_OR[e] + 0.01 * torch.randn(O, R, generator=g)
        clients.append(state)
    layers = [LayerNames("router", (), (("A", "B"),))]
    opts = FedAlignConfig(lora_direction=direction)
    res = fedalign_aggregate(glob, clients, torch.full((C,), 10.0), _stats(), layers, opts)
    assert res.experts_applied_L.all()
    assert res.aligned_LEC[0, 0].tolist() == [True, True, False]
    assert res.aligned_LEC[0, 1].all() and res.aligned_LEC[0, 2].all()
    new_B = b_view(res.state["B"], E)
    glob_B = b_view(glob["B"], E)[0]
    torch.testing.assert_close(new_B[0], glob_B + sum(b_view(clients[c]["B"], E)[0] - glob_B for c in (0, 1)) / 3)
    torch.testing.assert_close(new_B[1], sum(b_view(s["B"], E)[1] for s in clients) / 3)
    torch.testing.assert_close(res.state["A"], glob["A"])  # nobody moved A
    assert res.state["B"].shape == (O, R * E)


def test_a_federated_lora_experts_run_decides_aligned_sets(tmp_path, monkeypatch):
    cfg = load_config("tiny", overrides={"out_dir": str(tmp_path), "federation": {"strategy": "fedalign"},
                                         "model": {"backbone": "tiny-qwen3-moe", "trainable": "lora-experts"}})
    summary = run_in_process(cfg, monkeypatch)
    assert summary["rounds"] == 2 and summary["rounds_not_adopted"] == []
    for line in (tmp_path / "diagnostics.jsonl").read_text().splitlines():
        aligned = json.loads(line)["aligned"]
        assert aligned != ["not applied"] * 2 and all(isinstance(sets, list) and len(sets) == 4 for sets in aligned)
