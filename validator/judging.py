"""Judging one submission: decode, check, compare with earlier ones, evaluate; one verdict row out.

Order, cheapest first: the codec (format: declared experts, shapes, finite values), the checks
(version, norm cap), expert ownership (the experts the validator's own profile of the domain gives
it, plus `foreign_experts`), negligible size (score 0, not evaluated), exact copies (cosine to every
earlier decodable delta of the round above `copy_cosine`, reloaded one at a time), then held-out
evaluation on every scored domain with the guard, gain, noise and copy rules (validator/scoring.py);
the copy rule projects out the `copy_span` earlier deltas most like this one. "Earlier" is the order
of commitments (protocol.commit), not of arrival.
"""
from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from expertmesh.protocol.codec import decode_delta
from expertmesh.protocol.errors import DeltaFormatError
from expertmesh.protocol.experts import ExpertSet
from expertmesh.validator.checks import CheckedDelta, CheckFailed, check_delta
from expertmesh.validator.config import ScoringSection
from expertmesh.validator.ledger import SubmissionRow, VerdictRow
from expertmesh.validator.merge import merge_weight
from expertmesh.validator.runtime import ModelRuntime
from expertmesh.validator.scoring import BaseLosses, EvalRows, evaluate, nearest
from expertmesh.validator.spool import Spool

# Verdict codes of submissions whose payload never decoded or failed the checks: not compared for copies.
UNREADABLE = ("format", "version", "norm_cap")


@dataclass(frozen=True)
class RoundEval:
    """A round's fixed evaluation state: rows, base-model losses, and the experts each domain owns."""

    rows: EvalRows
    base: BaseLosses
    owned: dict[str, ExpertSet]


def decode(spool: Spool, sub: SubmissionRow, runtime: ModelRuntime) -> dict[str, torch.Tensor]:
    return decode_delta(spool.read(sub.path), runtime.shapes).tensors


def checked(spool: Spool, sub: SubmissionRow, runtime: ModelRuntime, base_version: int,
            cfg: ScoringSection) -> CheckedDelta:
    try:
        decoded = decode_delta(spool.read(sub.path), runtime.shapes)
    except DeltaFormatError as exc:
        raise CheckFailed("format", str(exc)) from None
    return check_delta(decoded.tensors, decoded.header.model_version, base_version, runtime.norms,
                       cfg.max_update_ratio)


def judge(sub: SubmissionRow, earlier: list[SubmissionRow], runtime: ModelRuntime, spool: Spool, base_version: int,
          ev: RoundEval, cfg: ScoringSection) -> VerdictRow:
    t0 = time.perf_counter()
    common = dict(digest=sub.digest, round=sub.round)

    def done(verdict: str, code: str, why: str, score: float = 0.0, **parts) -> VerdictRow:
        return VerdictRow(**common, verdict=verdict, code=code, reason=f"{code}: {why}" if why else code, score=score,
                          seconds=time.perf_counter() - t0, scored_ms=int(time.time() * 1000), **parts)

    try:
        delta = checked(spool, sub, runtime, base_version, cfg)
    except CheckFailed as exc:
        return done("rejected", exc.code, exc.message)
    sizes = dict(delta_norm=delta.norm, update_ratio=delta.max_expert_ratio)
    if sub.domain not in ev.rows.domain_NL:
        return done("rejected", "no_eval_data", f"domain {sub.domain!r} has too little held-out data to score", **sizes)
    foreign = delta.experts - ev.owned[sub.domain]
    if len(foreign) > cfg.foreign_experts:
        return done("rejected", "foreign_experts", f"{len(foreign)} of its {len(delta.experts)} experts are not "
                    f"{sub.domain!r}'s (allowed: {cfg.foreign_experts}; e.g. layer {min(foreign)[0]} expert "
                    f"{min(foreign)[1]}); train the experts your domain routes to", **sizes)
    if delta.relative_norm < cfg.negligible_ratio:
        return done("zero", "negligible", f"‖Δ‖/‖W‖ = {delta.relative_norm:.3g} < {cfg.negligible_ratio}", **sizes)

    def others() -> Iterator[tuple[str, dict[str, torch.Tensor]]]:
        for other in earlier:
            yield other.digest, decode(spool, other, runtime)

    near = nearest(delta.tensors, others(), cfg.copy_span)
    sizes["max_cosine"] = near.cosine
    if near.cosine > cfg.copy_cosine:
        return done("rejected", "copy", f"cosine {near.cosine:.4f} > {cfg.copy_cosine} with submission "
                    f"{near.twin[:16]}", copy_of=near.twin, **sizes)
    s = evaluate(runtime.moe, delta.tensors, sub.domain, ev.rows, ev.base, cfg.guard_epsilon, cfg.min_score, cfg.min_z,
                 near.related, cfg.copy_z)
    weight = merge_weight(s.score) if s.verdict == "accepted" else None
    return done(s.verdict, s.code, s.reason, s.score, base_loss=s.base_loss, new_loss=s.new_loss, sign_z=s.sign_z,
                copy_z=s.copy_z, copy_of=s.copy_of, cross=s.cross, eval_tokens=s.eval_tokens, weight=weight, **sizes)


def claim_order(sub: SubmissionRow) -> tuple[int, int]:
    """Scoring order: by commitment (protocol.commit), so of two copies the one committed first is the original;
    submissions from before commitments existed (schema 3 ledgers) by arrival, ahead of them."""
    return (sub.commit_seq if sub.commit_seq is not None else 0, sub.seq)


def comparable(subs: list[SubmissionRow], verdicts: dict[str, VerdictRow]) -> list[SubmissionRow]:
    """Earlier submissions a new one is compared with: those whose payload decoded and passed the checks."""
    return [s for s in subs if s.digest in verdicts and verdicts[s.digest].code not in UNREADABLE]
