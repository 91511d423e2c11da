"""Hostile clients for robustness experiments (``attack`` in the config; simulation only).

A hostile client trains honestly, then changes what it sends: the update (sign-flip, scale), its example
count (inflate) or FedAlign-MoE's routing statistics (capture). Each change keeps the reply inside every
rule the server's screen can check where that is possible, so that what is measured is what an attack
that gets through costs. A deployed node never attacks: ``client_app`` refuses such a run config.
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch

from ..config import AttackConfig
from ..core.statistics import ModelRoutingStatistics
from .protocol import LocalWork, TrainFigures

DEFAULT_FACTOR = {"scale": 9.0, "inflate": 100.0}


def hostile_update(attack: AttackConfig, state: dict[str, torch.Tensor],
                   global_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """sign-flip: w_g - (w - w_g); scale: w_g + factor (w - w_g); the state as it is for other kinds."""
    if attack.kind == "sign-flip":
        return {n: 2 * global_state[n] - w for n, w in state.items()}
    if attack.kind == "scale":
        factor = attack.factor or DEFAULT_FACTOR["scale"]
        return {n: global_state[n] + factor * (w - global_state[n]) for n, w in state.items()}
    return state


def hostile_claim(attack: AttackConfig, num_examples: int, figures: TrainFigures, work: LocalWork) -> tuple[int, TrainFigures]:
    """inflate: factor x the examples, with the step count the server derives from that claim."""
    if attack.kind != "inflate":
        return num_examples, figures
    claimed = math.ceil(num_examples * (attack.factor or DEFAULT_FACTOR["inflate"]))
    return claimed, replace(figures, train_steps=work.steps(claimed))


def hostile_statistics(attack: AttackConfig, routing: ModelRoutingStatistics, top_k: int) -> ModelRoutingStatistics:
    """capture: every layer's statistics claim expert ``attack.expert`` for all tokens, with probability 1,
    overlap and margin 1 (n(e) m(e) = p(e) T: the consistency rules hold); the other top-k selections spread
    evenly over the next experts with o = m = 0."""
    if attack.kind != "capture":
        return routing
    L, E = routing.p_LE.shape
    e, T = attack.expert, routing.tokens
    n_LE, p_LE = torch.zeros(L, E), torch.zeros(L, E)
    o_LE, m_LE = torch.zeros(L, E), torch.zeros(L, E)
    p_LE[:, e] = 1.0
    n_LE[:, e] = T
    o_LE[:, e] = m_LE[:, e] = 1.0
    for j in range(1, min(top_k, E)):  # top-k > 1: each further selection of every token on another expert
        n_LE[:, (e + j) % E] = T
    return ModelRoutingStatistics(p_LE, n_LE, o_LE, m_LE, routing.mu_LEH, T)
