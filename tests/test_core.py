"""The paper's mathematics on small hand-built cases whose answers are known."""


import pytest
import torch

from fedalign_moe.core.aggregate import apply_expert_weights
from fedalign_moe.core.gate_alignment import (
    adaptive_alpha,
    aggregate_router,
    consistency_weights,
    global_routing_distribution,
    routing_consistency,
)
from fedalign_moe.core.gate_regulariser import gate_regulariser
from fedalign_moe.core.semantic_alignment import align_expert, client_consistency
from fedalign_moe.core.statistics import RoutingAccumulator, topk_mask


def test_statistics_on_a_hand_built_batch():
    # 3 tokens, 3 experts, top-1; hidden = identity rows so logits = router rows picked by the token
    hidden_TH = torch.eye(3)
    logits_TE = torch.log(torch.tensor([[0.7, 0.2, 0.1], [0.6, 0.3, 0.1], [0.1, 0.1, 0.8]]))
    global_EH = torch.eye(3)  # global router sends token t to expert t
    acc = RoutingAccumulator(3, 3, top_k=1)
    acc.add(logits_TE, hidden_TH, global_EH)
    s = acc.result()
    assert torch.allclose(s.p_E, torch.tensor([1.4, 0.6, 1.0]) / 3)
    assert s.n_E.tolist() == [2, 0, 1]
    # expert 0: local {t0, t1}, global {t0} -> 1/2; expert 1: local {}, global {t1} -> 0; expert 2: {t2},{t2} -> 1
    assert torch.allclose(s.o_E, torch.tensor([0.5, 0.0, 1.0]))
    # margins: t0 0.7-0.2, t1 0.6-0.3 -> mean 0.4; t2 0.8-0.1 = 0.7
    assert torch.allclose(s.m_E, torch.tensor([0.4, 0.0, 0.7]))
    # signature of expert 0: (0.7 h0 + 0.6 h1) / 1.3
    assert torch.allclose(s.mu_EH[0], torch.tensor([0.7, 0.6, 0.0]) / 1.3)
    assert torch.equal(s.mu_EH[1], torch.zeros(3))


def test_omega_favours_consistent_confident_clients():
    # client 0 agrees with the global router and is confident; client 1 disagrees; client 2 is unsure
    o_CE = torch.tensor([[0.9, 0.8], [0.1, 0.2], [0.9, 0.8]])
    m_CE = torch.tensor([[0.5, 0.4], [0.5, 0.4], [0.05, 0.04]])
    omega_CE = consistency_weights(routing_consistency(o_CE, m_CE))
    assert torch.allclose(omega_CE.sum(0), torch.ones(2))
    for e in range(2):
        assert omega_CE[0, e] > omega_CE[1, e] and omega_CE[0, e] > omega_CE[2, e]
    assert omega_CE[0, 0] == pytest.approx(0.45 / (0.45 + 0.05 + 0.045))


def test_omega_with_tokens_and_empty_columns():
    s_CE = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    tokens_CE = torch.tensor([[1.0, 0.0], [3.0, 0.0]])
    omega_CE = consistency_weights(s_CE, tokens_CE)
    assert torch.allclose(omega_CE[:, 0], torch.tensor([0.25, 0.75]))
    assert torch.allclose(omega_CE[:, 1], torch.tensor([0.5, 0.5]))  # nobody routed: uniform


def test_global_distribution_and_router_rows():
    omega_CE = torch.tensor([[1.0, 0.25], [0.0, 0.75]])
    p_CE = torch.tensor([[0.6, 0.4], [0.2, 0.8]])
    p_g = global_routing_distribution(omega_CE, p_CE)
    raw = torch.tensor([0.6, 0.25 * 0.4 + 0.75 * 0.8])
    assert torch.allclose(p_g, raw / raw.sum())
    router_CEH = torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[3.0, 3.0], [4.0, 8.0]]])
    W = aggregate_router(router_CEH, omega_CE)
    assert torch.allclose(W, torch.tensor([[1.0, 0.0], [3.0, 6.25]]))


def test_adaptive_alpha():
    p_CE = torch.tensor([[0.5, 0.9, 0.0], [0.5, 0.1, 0.0]])
    alpha = adaptive_alpha(p_CE)
    # identical use -> 1; std/mean = 0.4/0.5 -> 0.2; unused -> clipped 1 - 0/eps = 1
    assert torch.allclose(alpha, torch.tensor([1.0, 0.2, 1.0]))


def test_regulariser_zero_at_p_g_positive_elsewhere_router_only_gradient():
    torch.manual_seed(0)
    hidden_TH = torch.randn(50, 4, requires_grad=True)
    router_EH = torch.nn.Parameter(torch.randn(3, 4))
    alpha_E = torch.ones(3)
    with torch.no_grad():
        p_hat = torch.softmax(hidden_TH @ router_EH.T, -1).mean(0)
    zero = gate_regulariser(router_EH, hidden_TH, p_hat, alpha_E, top_k=3)
    assert abs(float(zero.detach())) < 1e-6
    other = torch.tensor([0.8, 0.1, 0.1])
    reg = gate_regulariser(router_EH, hidden_TH, other, alpha_E, top_k=3)
    assert reg > 0
    # over all experts the regulariser is exactly KL(p_hat || p_g)
    kl = float((p_hat * (p_hat / other).log()).sum())
    assert float(reg) == pytest.approx(kl, rel=1e-5)
    reg.backward()
    assert router_EH.grad is not None and router_EH.grad.abs().sum() > 0
    assert hidden_TH.grad is None  # nothing reaches below the router
    # alpha = 0 switches the term off
    assert float(gate_regulariser(router_EH, hidden_TH, other, torch.zeros(3), top_k=3)) == 0.0


def test_regulariser_of_a_router_with_a_bias_reads_its_logits_with_the_bias():
    """GPT-OSS routes by h W^T + b: with W = 0 every token's distribution is softmax(b), so L_reg is zero at
    p_g = softmax(b) and KL(softmax(b) || uniform) at a uniform p_g (it read h W^T alone: the reverse)."""
    hidden_TH = torch.randn(10, 4)
    router_EH = torch.zeros(3, 4)
    bias_E = torch.nn.Parameter(torch.tensor([2.0, 0.0, -1.0]))
    p_b = torch.softmax(bias_E.detach(), -1)
    ones = torch.ones(3)
    assert float(gate_regulariser(router_EH, hidden_TH, p_b, ones, 3, bias_E).detach()) == pytest.approx(0.0, abs=1e-6)
    uniform = torch.full((3,), 1 / 3)
    reg = gate_regulariser(router_EH, hidden_TH, uniform, ones, 3, bias_E)
    assert float(reg) == pytest.approx(float((p_b * (p_b * 3).log()).sum()), rel=1e-5)
    reg.backward()
    assert bias_E.grad.abs().sum() > 0


def test_regulariser_is_nonnegative_on_any_topk_subset():
    torch.manual_seed(1)
    for _ in range(20):
        router_EH = torch.randn(6, 5)
        hidden_TH = torch.randn(7, 5)
        p_g = torch.softmax(torch.randn(6), 0)
        assert float(gate_regulariser(router_EH, hidden_TH, p_g, torch.rand(6), top_k=1)) >= 0


def _clients_for_alignment():
    mu_CH = torch.tensor([[1.0, 0.1], [0.9, 0.2], [1.0, 0.0], [-1.0, 0.1]])
    d = torch.tensor([1.0, 1.0, 0.0])
    delta_CP = torch.stack([d, d * 1.1 + torch.tensor([0.0, 0.1, 0.0]), d * 0.9, -d])
    return mu_CH, delta_CP


def test_opposing_client_is_left_out_and_does_not_move_the_expert():
    mu_CH, delta_CP = _clients_for_alignment()
    n_C = torch.tensor([10.0, 10.0, 20.0, 40.0])
    res = align_expert(mu_CH, delta_CP, n_C, beta=1.0)
    assert res.aligned_C.tolist() == [True, True, True, False]
    assert res.weights_C[3] == 0 and torch.allclose(res.weights_C[:3].double(), torch.tensor([0.25, 0.25, 0.5], dtype=torch.float64))
    glob = torch.zeros(3)
    new = apply_expert_weights(glob[None], [(glob + d)[None] for d in delta_CP], res.weights_C[None])[0]
    expected = 0.25 * delta_CP[0] + 0.25 * delta_CP[1] + 0.5 * delta_CP[2]
    assert torch.allclose(new, expected)


def test_client_that_routed_no_token_is_excluded_and_empty_set_keeps_the_expert():
    mu_CH, delta_CP = _clients_for_alignment()
    res = align_expert(mu_CH, delta_CP, torch.tensor([0.0, 5.0, 5.0, 5.0]), beta=1.0)
    assert not res.aligned_C[0]
    nobody = align_expert(mu_CH, delta_CP, torch.zeros(4), beta=1.0)
    assert not nobody.aligned_C.any()
    glob = torch.tensor([1.0, 2.0, 3.0])
    kept = apply_expert_weights(glob[None], [(glob + d)[None] for d in delta_CP], nobody.weights_C[None])[0]
    assert torch.equal(kept, glob)


def test_identical_clients_are_all_aligned():
    mu = torch.tensor([[0.3, 0.4]]).repeat(3, 1)
    delta = torch.tensor([[1.0, -2.0, 0.5]]).repeat(3, 1)
    res = align_expert(mu, delta, torch.tensor([1.0, 2.0, 3.0]), beta=1.0)
    assert res.aligned_C.all()
    assert torch.allclose(res.c_C, torch.ones(3, dtype=res.c_C.dtype))


def test_client_consistency_excludes_self():
    gamma = torch.tensor([[1.0, 0.5, 0.0], [0.5, 1.0, 0.25], [0.0, 0.25, 1.0]], dtype=torch.float64)
    assert torch.allclose(client_consistency(gamma), torch.tensor([0.25, 0.375, 0.125], dtype=torch.float64))


def test_topk_mask():
    m = topk_mask(torch.tensor([[0.1, 0.5, 0.4], [0.7, 0.2, 0.1]]), 2)
    assert m.tolist() == [[False, True, True], [True, True, False]]


def test_routing_statistics_mask_padding_by_multiplication_as_indexing_would():
    """The accumulator masks padding without a boolean index (no device sync): same numbers as indexing."""
    g = torch.Generator().manual_seed(3)
    logits_TE, hidden_TH, router_EH = torch.randn(12, 4, generator=g), torch.randn(12, 5, generator=g), torch.randn(4, 5, generator=g)
    keep_T = torch.tensor([1, 1, 0, 1, 0, 0, 1, 1, 1, 0, 1, 1]).bool()
    masked, indexed = RoutingAccumulator(4, 5, top_k=2), RoutingAccumulator(4, 5, top_k=2)
    masked.add(logits_TE, hidden_TH, router_EH, keep_T)
    indexed.add(logits_TE[keep_T], hidden_TH[keep_T], router_EH)
    a, b = masked.result(), indexed.result()
    assert a.tokens == b.tokens == 8
    for name in ("p_E", "n_E", "o_E", "m_E", "mu_EH"):
        assert torch.allclose(getattr(a, name), getattr(b, name), atol=1e-6), name
