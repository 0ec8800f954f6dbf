"""The DiLoCo outer step, per expert. Tensors in, tensors out; no I/O.

For each expert touched by an accepted delta: the weighted mean of the deltas that touch it
(weights ∝ score × tokens, normalised over those deltas), then a Nesterov step with a momentum kept
per expert across rounds. In delta sign (u = mean delta, the negated DiLoCo outer gradient):
    m ← μ·m + u;   θ ← θ + lr·(u + μ·m)   (Nesterov)   or   θ ← θ + lr·m   (plain momentum)
Untouched experts and their momenta do not move. Every sum runs in a fixed order (deltas in arrival
order, keys sorted) in fp32 on CPU, so the same inputs give bit-identical outputs.
"""
from __future__ import annotations

from collections.abc import Mapping

import torch

from expertmesh.validator.config import MergeSection

def merge_weight(score: float, tokens: int, max_tokens: int) -> float:
    """score × tokens; tokens are the miner's own claim, so they are clamped to [1, max_tokens]."""
    return float(score) * float(min(max(int(tokens), 1), max_tokens))


class WeightedMean:
    """Running Σ w·Δ and Σ w per tensor: deltas are added one at a time, so memory holds one delta plus the sums."""

    def __init__(self) -> None:
        self._sum: dict[str, torch.Tensor] = {}
        self._weight: dict[str, float] = {}

    def add(self, delta: Mapping[str, torch.Tensor], weight: float) -> None:
        assert weight > 0, weight
        for key in sorted(delta):
            d = delta[key].float()
            if key in self._sum:
                self._sum[key].add_(d * weight)
            else:
                self._sum[key] = d * weight
            self._weight[key] = self._weight.get(key, 0.0) + weight

    def result(self) -> dict[str, torch.Tensor]:
        return {k: self._sum[k] / self._weight[k] for k in sorted(self._sum)}


def outer_step(base: Mapping[str, torch.Tensor], mean_delta: Mapping[str, torch.Tensor],
               momentum: Mapping[str, torch.Tensor], cfg: MergeSection
               ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(new weights, new momenta) for exactly the keys of mean_delta; a key without momentum starts at zero."""
    new_w, new_m = {}, {}
    for key in sorted(mean_delta):
        u = mean_delta[key].float()
        m_prev = momentum.get(key)
        m = u.clone() if m_prev is None else m_prev.float() * cfg.momentum + u
        step = (u + m * cfg.momentum) if cfg.nesterov else m
        new_w[key] = base[key].float() + step * cfg.outer_lr
        new_m[key] = m
    return new_w, new_m
