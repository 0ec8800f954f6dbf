"""Proof of loss: score a delta by how much it lowers held-out loss. Tensors in, numbers out; no I/O.

score_i = max(0, L_d(θ_v) − L_d(θ_v + Δ_i)) on fixed rows of domain d's held-out split, so the same
model, delta and rows always give the same score. A general guard measures the same on a fixed mix
of every domain's held-out rows and rejects a delta that raises it by more than ε. A delta that is
(nearly) zero, or a near-copy of an earlier one in the round, never reaches evaluation.

Legend: N rows, L tokens per row.
"""
from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from expertmesh.node.evaluate import mean_loss
from expertmesh.node.moe import MoEModel


@dataclass(frozen=True)
class EvalRows:
    """The fixed evaluation batches of one round: per domain, and the general mix."""

    domain_NL: dict[str, torch.Tensor]
    general_NL: torch.Tensor
    batch_size: int

    def tokens(self, domain: str) -> int:
        return int(self.domain_NL[domain][:, 1:].numel())


@dataclass(frozen=True)
class BaseLosses:
    domain: dict[str, float]
    general: float


@dataclass(frozen=True)
class Score:
    verdict: str  # accepted | zero | rejected
    code: str
    reason: str
    score: float
    base_loss: float | None = None
    new_loss: float | None = None
    general_base: float | None = None
    general_new: float | None = None
    eval_tokens: int | None = None


@contextmanager
def applied(moe: MoEModel, delta: Mapping[str, torch.Tensor]) -> Iterator[None]:
    """θ + Δ inside the block; afterwards the touched weights are restored bit for bit (θ+Δ−Δ is not θ)."""
    saved = {key: moe.weight(key).clone() for key in delta}
    try:
        moe.add_delta(dict(delta))
        yield
    finally:
        with torch.no_grad():
            for key, w in saved.items():
                moe.weight(key).copy_(w)


def base_losses(moe: MoEModel, rows: EvalRows) -> BaseLosses:
    return BaseLosses({d: mean_loss(moe.model, r, rows.batch_size) for d, r in sorted(rows.domain_NL.items())},
                      mean_loss(moe.model, rows.general_NL, rows.batch_size))


def global_norm(tensors: Mapping[str, torch.Tensor]) -> float:
    return math.sqrt(sum(float(t.double().pow(2).sum()) for _, t in sorted(tensors.items())))


def cosine(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> float:
    """Cosine of two deltas as vectors over all expert tensors (a tensor one of them lacks counts as zero)."""
    na, nb = global_norm(a), global_norm(b)
    if na == 0 or nb == 0:
        return 0.0
    dot = sum(float((a[k].double() * b[k].double()).sum()) for k in sorted(a.keys() & b.keys()))
    return dot / (na * nb)


def max_cosine(delta: Mapping[str, torch.Tensor], earlier: Iterator[tuple[str, Mapping[str, torch.Tensor]]]
               ) -> tuple[float, str | None]:
    """Highest cosine to any earlier delta (given one at a time, so memory holds two), and whose it is."""
    best, who = -math.inf, None
    for name, other in earlier:
        c = cosine(delta, other)
        if c > best:
            best, who = c, name
    return (best, who) if who is not None else (0.0, None)


def evaluate(moe: MoEModel, delta: Mapping[str, torch.Tensor], domain: str, rows: EvalRows, base: BaseLosses,
             guard_epsilon: float, min_score: float) -> Score:
    """Score one delta that passed the checks: domain gain first, then the general guard."""
    with applied(moe, delta):
        new_loss = mean_loss(moe.model, rows.domain_NL[domain], rows.batch_size)
        general_new = mean_loss(moe.model, rows.general_NL, rows.batch_size)
    base_loss = base.domain[domain]
    score = max(0.0, base_loss - new_loss)
    parts = dict(base_loss=base_loss, new_loss=new_loss, general_base=base.general, general_new=general_new,
                 eval_tokens=rows.tokens(domain))
    rise = general_new - base.general
    if rise > guard_epsilon:
        return Score("rejected", "general_guard", f"general held-out loss rose by {rise:.4f} > {guard_epsilon}", 0.0,
                     **parts)
    if score <= min_score:
        return Score("zero", "no_gain", f"held-out loss {base_loss:.4f} -> {new_loss:.4f}", 0.0, **parts)
    return Score("accepted", "ok", "", score, **parts)
