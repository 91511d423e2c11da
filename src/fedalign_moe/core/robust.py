"""Bounded client weights [ours]: what a claim or an update can buy in one aggregation.

A client's weight in an average is what it says (its example count, its routing consistency). A claim
the server cannot verify is bounded instead: at a multiple of the round's median claim, then at a share
of the round, the excess spread over the others in proportion to their own weights (water filling).
An update's norm, for the work it did, is bounded at a multiple of the round's median (``norm_clip_scales``).
Pure torch; C clients.
"""

from __future__ import annotations

import statistics

import torch


def water_fill(w_C: torch.Tensor, cap_C: torch.Tensor) -> torch.Tensor:
    """Weights proportional to ``w_C`` that sum to 1 with none above its cap: each weight over its cap is set
    to it and the mass it gives up goes to the others, in proportion to theirs. Needs sum(cap_C) >= 1;
    float64 [C]. Weights already under their caps come back as ``w_C / w_C.sum()``."""
    w_C, cap_C = w_C.double().clamp(min=0), cap_C.double()
    if float(cap_C.sum()) < 1 - 1e-12:
        raise ValueError(f"caps adding up to {float(cap_C.sum()):.4g} < 1 cannot hold a distribution")
    base_C = w_C if float(w_C.sum()) > 0 else torch.ones_like(w_C)
    fixed_C = torch.zeros_like(base_C, dtype=torch.bool)
    for _ in range(len(base_C)):
        free = 1.0 - float(cap_C[fixed_C].sum())
        rest_C = torch.where(fixed_C, 0.0, base_C)
        if float(rest_C.sum()) == 0:  # every client with weight is capped: spread what is left evenly
            rest_C = torch.where(fixed_C, 0.0, 1.0)
        out_C = torch.where(fixed_C, cap_C, rest_C * free / rest_C.sum())
        over_C = ~fixed_C & (out_C > cap_C * (1 + 1e-12))
        if not over_C.any():
            return out_C
        fixed_C |= over_C
    return out_C


def bounded_example_counts(examples_C: torch.Tensor, max_ratio: float | None = None,
                           max_share: float | None = None, min_clients_for_share: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """(the counts [C] each client weighs with, float64; bool [C], True where a bound lowered one).

    ``max_ratio``: a count above ``max_ratio`` x the round's median counts as that much. ``max_share``: no
    client above that share of the round, once the round has ``min_clients_for_share`` clients (with
    fewer, an honest client's share is large by nature, and a cap would buy little); what a capped client
    gives up goes to the others in proportion to their counts. A count no bound touches comes back as it is.
    """
    n_C = examples_C.double()
    bounded_C = n_C.clamp(max=max_ratio * statistics.median(n_C.tolist())) if max_ratio is not None else n_C.clone()
    total = float(bounded_C.sum())
    if max_share is not None and len(n_C) >= min_clients_for_share and max_share * len(n_C) >= 1 and \
            float(bounded_C.max()) > max_share * total:
        bounded_C = water_fill(bounded_C, torch.full_like(bounded_C, max_share)) * total
    lowered_C = bounded_C / float(bounded_C.sum()) < n_C / float(n_C.sum()) * (1 - 1e-9)
    return bounded_C, lowered_C


def bounded_shares(omega_CE: torch.Tensor, cap_C: torch.Tensor) -> torch.Tensor:
    """Each column of omega [C, E] (a distribution over clients) water-filled under the caps [C] (which sum
    to at least 1); a column already under them is returned as it was. Same dtype as ``omega_CE``."""
    out_CE = omega_CE.clone()
    for e in range(omega_CE.shape[1]):
        if (omega_CE[:, e].double() > cap_C * (1 + 1e-12)).any():
            out_CE[:, e] = water_fill(omega_CE[:, e], cap_C).to(omega_CE.dtype)
    return out_CE


def trimmed_mean(x_CP: torch.Tensor, trim: float) -> torch.Tensor:
    """Coordinate-wise mean of [C, P] after cutting floor(trim x C) values from each end of every
    coordinate; ``trim`` = 0.5 is the coordinate-wise median (the mean of the middle two for even C). [P]"""
    C = x_CP.shape[0]
    cut = min(int(trim * C), (C - 1) // 2)
    if cut == 0:
        return x_CP.mean(0)
    return x_CP.sort(0).values[cut:C - cut].mean(0)


def norm_clip_scales(pace_C: torch.Tensor, ratio: float) -> torch.Tensor:
    """The factor each update is multiplied by so that its pace (its norm over its amount of work) is at most ``ratio`` x
    the median pace: min(1, ratio x median / pace_i). float64 [C]; 1 where the median or the pace is 0."""
    pace_C = pace_C.double()
    limit = ratio * statistics.median(pace_C.tolist())
    if limit <= 0:
        return torch.ones_like(pace_C)
    return torch.where(pace_C > limit, limit / pace_C.clamp(min=1e-300), torch.ones_like(pace_C))
