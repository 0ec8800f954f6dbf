"""Proof of loss: score a delta by how much it lowers held-out loss. Tensors in, numbers out; no I/O.

score_i = max(0, L_d(θ_v) − L_d(θ_v + Δ_i)) on fixed rows of domain d's held-out split, so the same
model, delta and rows always give the same score. Three rules decide on top of it:
- per-domain guard: the delta must not raise any other scored domain's held-out loss by more than ε
  (each domain on its own: a gain on one domain cannot hide a loss on another);
- noise: the delta's signs must agree with the held-out loss's descent direction beyond chance. With
  g the gradient of domain d's held-out loss at θ_v over the delta's experts and a_i = −g_i·Δ_i,
  z = Σ a_i / √(Σ a_i²); a delta whose signs carry no information about g (noise) has
  P(z ≥ t) ≤ exp(−t²/2) whatever its magnitudes (Hoeffding), and it must reach z ≥ min_z;
- the score must be above min_score.
- copy: what is left of the delta once the round's earlier deltas most like it are projected out
  (least squares over its own tensors) must pass the noise test too, at z ≥ copy_z. A copy, scaled,
  cut to some experts or buried in noise, leaves only that noise (z near 0); an honest miner's own
  work survives the projection (measured in scripts/bench_copies.py).
A delta that is (nearly) zero, or an exact copy (cosine > copy_cosine), never reaches evaluation.

Legend: N rows, L tokens per row, D scored domains.
"""
from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from expertmesh.node.evaluate import row_losses, token_losses
from expertmesh.node.moe import MoEModel
from expertmesh.node.train import SelectiveExperts
from expertmesh.protocol.experts import ExpertSet


@dataclass(frozen=True)
class EvalRows:
    """The fixed evaluation batches of one round, per scored domain."""

    domain_NL: dict[str, torch.Tensor]
    batch_size: int

    def tokens(self, domain: str) -> int:
        return int(self.domain_NL[domain][:, 1:].numel())


@dataclass(frozen=True)
class BaseLosses:
    """The round's model on every scored domain's rows: per-row losses [N] (float64)."""

    rows: dict[str, torch.Tensor]

    @property
    def domain(self) -> dict[str, float]:
        return {d: float(r.mean()) for d, r in self.rows.items()}


@dataclass(frozen=True)
class Score:
    verdict: str  # accepted | zero | rejected
    code: str
    reason: str
    score: float
    base_loss: float | None = None
    new_loss: float | None = None
    sign_z: float | None = None
    cross: dict[str, list[float]] | None = None  # every scored domain: [loss before, loss after]
    eval_tokens: int | None = None
    copy_z: float | None = None  # the copy rule's z of what earlier deltas leave unexplained
    copy_of: str | None = None


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
    return BaseLosses({d: row_losses(moe.model, r, rows.batch_size) for d, r in sorted(rows.domain_NL.items())})


def loss_grads(moe: MoEModel, experts: ExpertSet, rows_NL: torch.Tensor, batch_size: int) -> dict[str, torch.Tensor]:
    """∂ mean held-out loss / ∂ W at the current weights, for the given experts only (canonical keys)."""
    sel = SelectiveExperts(moe, experts)
    was_training = moe.model.training
    moe.model.eval()
    try:
        count = rows_NL[:, 1:].numel()
        for i in range(0, rows_NL.shape[0], batch_size):
            (token_losses(moe.model, rows_NL[i : i + batch_size]).sum() / count).backward()
        return sel.grads()
    finally:
        sel.detach()
        moe.model.train(was_training)


def sign_z(grads: Mapping[str, torch.Tensor], delta: Mapping[str, torch.Tensor]) -> float:
    """Σ a / √Σ a² with a = −g·Δ elementwise: how far the delta's signs agree with descent beyond chance."""
    total, square = 0.0, 0.0
    for key in sorted(delta):
        a = -(grads[key].double() * delta[key].double())
        total += float(a.sum())
        square += float(a.pow(2).sum())
    return total / math.sqrt(square) if square > 0 else 0.0


def global_norm(tensors: Mapping[str, torch.Tensor]) -> float:
    return math.sqrt(sum(float(t.double().pow(2).sum()) for _, t in sorted(tensors.items())))


def dot(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> float:
    """Inner product of two deltas as vectors over all expert tensors, in float64 (a tensor one lacks is zero)."""
    return sum(float((a[k].double() * b[k].double()).sum()) for k in sorted(a.keys() & b.keys()))


def _cosine(ab: float, na: float, nb: float) -> float:
    return ab / (na * nb) if na and nb else 0.0


def cosine(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> float:
    """Cosine of two deltas as vectors over all expert tensors (a tensor one of them lacks counts as zero)."""
    return _cosine(dot(a, b), global_norm(a), global_norm(b))


def residual(delta: Mapping[str, torch.Tensor], earlier: Sequence[Mapping[str, torch.Tensor]]
             ) -> tuple[dict[str, torch.Tensor], list[float]]:
    """Δ minus its least-squares projection on the span of earlier deltas, over Δ's own tensors.

    Returns the residual and the coefficients c (Δ ≈ Σ c_j E_j + residual). A copy of an earlier delta,
    scaled, cut to some of its experts or buried in added noise, leaves a residual that is that noise."""
    keys = sorted(delta)
    E = [{k: e[k].double() for k in keys if k in e} for e in earlier]
    d = {k: delta[k].double() for k in keys}
    G = torch.tensor([[dot(a, b) for b in E] for a in E], dtype=torch.float64).reshape(len(E), len(E))
    rhs = torch.tensor([dot(e, d) for e in E], dtype=torch.float64)
    c = (torch.linalg.pinv(G, hermitian=True) @ rhs).tolist() if E else []
    out = {}
    for k in keys:
        r = d[k].clone()
        for cj, e in zip(c, E):
            if k in e:
                r -= cj * e[k]
        out[k] = r.to(delta[k].dtype)
    return out, c


@dataclass(frozen=True)
class Nearest:
    """A delta against the round's earlier ones: the highest cosine, whose it is, and the `span` most
    similar (cosine > 0, highest first) cut to the delta's own tensors, for the copy rule."""

    cosine: float
    twin: str | None
    related: list[tuple[str, dict[str, torch.Tensor]]]


def nearest(delta: Mapping[str, torch.Tensor], earlier: Iterator[tuple[str, Mapping[str, torch.Tensor]]],
            span: int = 0) -> Nearest:
    """Earlier deltas come one at a time, so memory holds this one, one earlier and `span` cut ones."""
    best, who, related = -math.inf, None, []
    norm = global_norm(delta)  # once, not once per earlier delta
    for name, other in earlier:
        c = _cosine(dot(delta, other), norm, global_norm(other))
        if c > best:
            best, who = c, name
        if span and c > 0:
            related.append((c, name, {k: other[k] for k in delta if k in other}))
            related = sorted(related, key=lambda r: -r[0])[:span]
    return Nearest(best if who is not None else 0.0, who, [(name, t) for _, name, t in related])


def evaluate(moe: MoEModel, delta: Mapping[str, torch.Tensor], domain: str, rows: EvalRows, base: BaseLosses,
             guard_epsilon: float, min_score: float, min_z: float,
             related: Sequence[tuple[str, Mapping[str, torch.Tensor]]] = (), copy_z: float = 0.0) -> Score:
    """Score one delta that passed the checks: every scored domain's loss, then guard, gain, noise and copy rules.

    Copy rule: Δ minus its projection on the `related` earlier deltas (scoring.residual) must itself pass
    the noise rule's test at z ≥ copy_z; what an earlier delta explains is not this delta's work."""
    with applied(moe, delta):
        after = {d: row_losses(moe.model, r, rows.batch_size) for d, r in sorted(rows.domain_NL.items())}
    cross = {d: [float(base.rows[d].mean()), float(a.mean())] for d, a in after.items()}
    base_loss, new_loss = cross[domain]
    score = max(0.0, base_loss - new_loss)
    parts = dict(base_loss=base_loss, new_loss=new_loss, cross=cross, eval_tokens=rows.tokens(domain))
    rises = {d: a - b for d, (b, a) in cross.items() if d != domain}
    worst = max(sorted(rises), key=rises.__getitem__, default=None)
    if worst is not None and rises[worst] > guard_epsilon:
        return Score("rejected", "domain_guard", f"held-out loss of domain {worst!r} rose by {rises[worst]:.4f} > "
                     f"{guard_epsilon}", 0.0, **parts)
    if score <= min_score:
        return Score("zero", "no_gain", f"held-out loss {base_loss:.4f} -> {new_loss:.4f}", 0.0, **parts)
    grads = loss_grads(moe, ExpertSet.from_keys(delta), rows.domain_NL[domain], rows.batch_size)
    z = sign_z(grads, delta)
    parts["sign_z"] = z
    if z < min_z:
        return Score("zero", "noise", f"gain {score:.5f} is not told from noise: its signs agree with the held-out "
                     f"gradient at z = {z:.2f} < {min_z} (a random-sign delta reaches {min_z} with probability "
                     f"≤ {math.exp(-min_z * min_z / 2):.1g})", 0.0, **parts)
    if related:
        left, coefs = residual(delta, [t for _, t in related])
        # an exact (partial) copy leaves float rounding only, whose signs follow Δ: that is nothing left
        exact = global_norm(left) <= 1e-6 * global_norm(delta)
        parts["copy_z"] = rz = 0.0 if exact else sign_z(grads, left)
        if rz < copy_z:
            share = [abs(c) * global_norm(t) for c, (_, t) in zip(coefs, related)]
            twin = related[share.index(max(share))][0]
            return Score("rejected", "copy", f"with earlier deltas projected out (most: {twin[:16]}, coefficient "
                         f"{coefs[share.index(max(share))]:.2f}) what is left is noise: z = {rz:.2f} < {copy_z} "
                         f"(the whole delta: z = {z:.1f})", 0.0, copy_of=twin, **parts)
    return Score("accepted", "ok", "", score, **parts)
