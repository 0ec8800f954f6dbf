"""The DiLoCo outer step, per expert. Tensors in, tensors out; no I/O.

For each expert touched by an accepted delta: the weighted mean of the deltas that touch it
(weights ∝ score, normalised over those deltas), then a Nesterov step with a momentum kept
per expert across rounds. In delta sign (u = mean delta, the negated DiLoCo outer gradient):
    m ← μ·m + u;   θ ← θ + lr·(u + μ·m)   (Nesterov)   or   θ ← θ + lr·m   (plain momentum)
Untouched experts and their momenta do not move. Every sum runs in a fixed order (deltas in arrival
order, keys sorted) in fp32 on CPU, so the same inputs give bit-identical outputs.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence

import torch

from expertmesh.validator.config import MergeSection

def merge_weight(score: float) -> float:
    """A delta's weight in the per-expert mean: its score, the held-out loss the validator measured it remove.

    Nothing the miner claims (its token count included) enters: a claim cannot be checked, so it cannot buy weight.
    """
    return float(score)


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



def interference_scales(parent: Mapping[str, float], alone: Sequence[Mapping[str, float]], domains: Sequence[str],
                        merged_losses: Callable[[list[float]], dict[str, float]], tolerance: float, tries: int,
                        worked: Iterable[str] = ()) -> tuple[list[float], dict[str, float]]:
    """Per-delta scales so that the merge leaves no scored domain worse than its parent.

    A domain with an accepted delta of its own this round, or one that miners worked on (`worked`:
    their deltas were evaluated and found no gain), may not end above its parent's loss at all; one
    that nobody trained this round may end up to `tolerance` above. alone[i] is every scored domain's
    held-out loss of parent + delta i alone (domains[i] is the delta's own domain); merged_losses(scales)
    measures the merge with each delta scaled. While some domain is over its bound, the deltas of other
    domains that raised the worst such domain's loss alone are halved (every other domain's delta when
    none did alone), at most `tries` times. Returns the scales and the merged losses they give.
    """
    scales = [1.0] * len(alone)
    merged = merged_losses(scales)
    strict = set(domains) | set(worked)
    bound = {d: parent[d] + (0.0 if d in strict else tolerance) for d in parent}
    for _ in range(tries):
        over = {d: merged[d] - bound[d] for d in parent if merged[d] > bound[d]}
        if not over:
            break
        worst = max(sorted(over), key=over.__getitem__)
        others = [i for i, own in enumerate(domains) if own != worst]
        if not others:
            break  # only the domain's own deltas are left: they were each scored as gains on it
        for i in [i for i in others if alone[i][worst] > parent[worst]] or others:
            scales[i] *= 0.5
        merged = merged_losses(scales)
    return scales, merged
