"""LoRA factors of stacked experts, expert by expert [ours].

With LoRA on a stacked expert tensor W [E, X, Y] (peft's ``ParamWrapper``), expert e's update is the
product B_e A_e of its own rank-r factors, stored for all experts in two matrices:
- A [E*r, I]: expert-major rows, rows e*r .. e*r + r - 1 are A_e [r, I];
- B [O, r*E]: expert-minor columns, column k*E + e is the k-th column of B_e [O, r].
``a_view``/``b_view`` show them as [E, ...] views so that component 3 (semantic-aware expert aggregation)
treats factor e like row e of a stacked expert tensor; ``fold_a``/``fold_b`` put [E, ...] tensors back.

The update direction of expert e that the alignment compares (cosines between clients) is a choice:
- ``product``: Delta_c[e] = B_c,e A_c,e - B_g,e A_g,e, the change of the function the expert computes
  (unchanged by the factors' gauge freedom B -> B M, A -> M^-1 A). Its Gram matrix needs no O x I
  product: <B_a A_a, B_b A_b> = sum_rs (B_a^T B_b)_rs (A_a A_b^T)_rs (``product_gram``).
- ``factors``: Delta_c[e] = (A_c,e - A_g,e, B_c,e - B_g,e) concatenated.
Either way the factors are then averaged separately over A(e) with the same weights (FedIT's rule,
expert by expert); sum_c w_c B_c A_c is not sum_c w_c B_c times sum_c w_c A_c, and the aggregation
does not pretend otherwise.
Shapes: N = 1 + C states (the global one first), E experts, r rank, I and O the factors' outer sizes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch


def a_view(A: torch.Tensor, E: int) -> torch.Tensor:
    """A [E*r, I] as A_ErI (a view)."""
    return A.view(E, -1, A.shape[-1])


def b_view(B: torch.Tensor, E: int) -> torch.Tensor:
    """B [O, r*E] as B_EOr (a view: column k*E + e is B_e[:, k])."""
    return B.view(B.shape[0], -1, E).permute(2, 0, 1)


def fold_a(A_ErI: torch.Tensor) -> torch.Tensor:
    """A_ErI back to peft's [E*r, I]."""
    return A_ErI.reshape(-1, A_ErI.shape[-1])


def fold_b(B_EOr: torch.Tensor) -> torch.Tensor:
    """B_EOr back to peft's [O, r*E]."""
    return B_EOr.permute(1, 2, 0).reshape(B_EOr.shape[1], -1)


def product_gram(pairs: Sequence[tuple[str, str]], global_state: Mapping[str, torch.Tensor],
                 client_states: Sequence[Mapping[str, torch.Tensor]], E: int) -> torch.Tensor:
    """gram [E, C, C] of the clients' product updates, summed over the (A name, B name) ``pairs``:
    gram[e, i, j] = <B_i,e A_i,e - B_g,e A_g,e, B_j,e A_j,e - B_g,e A_g,e> (Frobenius)."""
    C = len(client_states)
    gram_ECC = torch.zeros(E, C, C, dtype=torch.float64)
    for a, b in pairs:
        A_NErI = torch.stack([a_view(s[a], E) for s in (global_state, *client_states)]).double()
        B_NEOr = torch.stack([b_view(s[b], E) for s in (global_state, *client_states)]).double()
        BtB_NNErr = torch.einsum("aeor,beos->abers", B_NEOr, B_NEOr)
        AAt_NNErr = torch.einsum("aeri,besi->abers", A_NErI, A_NErI)
        inner_ENN = (BtB_NNErr * AAt_NNErr).sum((-2, -1)).permute(2, 0, 1)  # <P_a,e, P_b,e>
        gram_ECC += (inner_ENN[:, 1:, 1:] - inner_ENN[:, 1:, :1] - inner_ENN[:, :1, 1:] + inner_ENN[:, :1, :1])
    return gram_ECC
