"""Personalised experts [ours].

Component 3 merges expert e of layer l only across A(e), the clients whose copies play the same role.
A client outside A(e) gets the merged expert back all the same, one that was built without its copy.
With personalised experts it keeps its own expert e instead (every row of e in the stacked expert
tensors, its LoRA factors, and router row e that sends tokens to it) for its own use: it trains from
its own copy and is measured on it; no peer ever receives it (the server never merges it into A(e)'s
expert, and sends it to nobody).

``personal_LE[l, e]`` (bool) says which experts a client keeps: the server's aligned sets of the last
round it took part in, negated (``personal_mask_LEC``). The expert and router tensors are named per layer
(``aggregate.LayerNames``); stacked tensors are [E, ...], LoRA factors are seen through ``lora_experts``.
Shapes: L MoE layers, E experts, C clients.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from .aggregate import LayerNames
from .lora_experts import a_view, b_view

State = Mapping[str, torch.Tensor]


def personal_mask_LEC(aligned_LEC: torch.Tensor, experts_applied_L: torch.Tensor) -> torch.Tensor:
    """bool [L, E, C]: client c keeps its own expert e of layer l when it is outside A(e) in a layer whose
    experts were aligned (a layer whose experts did not travel has no aligned sets to act on)."""
    return ~aligned_LEC.bool() & experts_applied_L.bool()[:, None, None]


def _rows_E(name: str, layer: LayerNames, t: torch.Tensor, E: int) -> torch.Tensor:
    """``t`` as an [E, ...] view: expert e (router row e) at index e."""
    for a, b in layer.lora:
        if name == a:
            return a_view(t, E)
        if name == b:
            return b_view(t, E)
    return t


def with_own_experts(global_state: State, own_state: State, personal_LE: torch.Tensor,
                     layers: Sequence[LayerNames]) -> dict[str, torch.Tensor]:
    """The state a client starts its round from: ``global_state``, except that wherever ``personal_LE[l, e]``
    expert e of layer l and router row e come from ``own_state`` (the client's own last copy). Tensors of
    ``global_state`` not touched are returned as they are (no copy); touched ones are copied first.

    personal_LE: bool [L, E]; every name it touches must be in both states with the same shape.
    """
    L, E = personal_LE.shape
    if L != len(layers):
        raise ValueError(f"personal_LE has {L} layers, the model {len(layers)}")
    out = dict(global_state)
    for l, layer in enumerate(layers):
        experts_E = personal_LE[l].nonzero().flatten().tolist()
        if not experts_E:
            continue
        for name in layer.tensor_names():
            if name not in global_state:
                continue  # not trained (frozen stacked experts under LoRA): the same on every client
            own = own_state[name]
            if own.shape != global_state[name].shape:
                raise ValueError(f"{name}: own copy {tuple(own.shape)}, global {tuple(global_state[name].shape)}")
            merged = global_state[name].clone()
            merged_E, own_E = _rows_E(name, layer, merged, E), _rows_E(name, layer, own, E)
            for e in experts_E:
                merged_E[e].copy_(own_E[e])
            out[name] = merged
    return out
