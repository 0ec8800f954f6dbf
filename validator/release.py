"""Merge a round's accepted deltas into the model and publish the next version (files only).

Everything written here is derived from the ledger (base version, accepted verdicts in arrival
order, momentum references) and is written before the single ledger transaction that makes it
current (RoundBook.finish_published). A crash anywhere before that commit leaves the ledger on the
old version; redoing the step gives byte-identical files, which simply replace the leftovers.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from expertmesh.protocol.experts import ExpertSet, expert_keys
from expertmesh.validator.config import MergeSection
from expertmesh.protocol.files import file_sha256, fsync_path
from expertmesh.node.evaluate import row_losses
from expertmesh.validator.judging import RoundEval, decode
from expertmesh.validator.ledger import Ledger, RoundRow, SubmissionRow, VerdictRow, VersionRow
from expertmesh.validator.merge import WeightedMean, interference_scales, outer_step
from expertmesh.validator.publish import manifest_sha256, write_checkpoint
from expertmesh.validator.runtime import ModelRuntime
from expertmesh.validator.scoring import applied
from expertmesh.validator.spool import Spool

@dataclass(frozen=True)
class Release:
    version: VersionRow
    momentum: dict[tuple[int, int], tuple[str, str]]  # (layer, expert) -> (path under state dir, sha256)
    directory: Path


def load_momentum(state_dir: Path, refs: dict[tuple[int, int], tuple[str, str]], experts: ExpertSet
                  ) -> dict[str, torch.Tensor]:
    out = {}
    for le in (le for le in experts if le in refs):
        path, sha = refs[le]
        if file_sha256(state_dir / path) != sha:
            raise ValueError(f"{state_dir / path}: momentum file does not match the ledger; the state was altered")
        out.update(load_file(state_dir / path))
    return out


def save_momentum(state_dir: Path, round_number: int, momentum: dict[str, torch.Tensor]
                  ) -> dict[tuple[int, int], tuple[str, str]]:
    """One safetensors file per expert (gate, up, down momenta), fsynced; never pickle."""
    folder = state_dir / "momentum" / f"r{round_number}"
    folder.mkdir(parents=True, exist_ok=True)
    refs = {}
    for layer, expert in ExpertSet.from_keys(momentum):
        rel = f"momentum/r{round_number}/{layer}.{expert}.safetensors"
        save_file({k: momentum[k].contiguous() for k in expert_keys(layer, expert)}, state_dir / rel)
        fsync_path(state_dir / rel)
        refs[(layer, expert)] = (rel, file_sha256(state_dir / rel))
    fsync_path(folder)
    return refs


def merge_round(runtime: ModelRuntime, spool: Spool, accepted: list[tuple[SubmissionRow, VerdictRow]],
                momentum: Callable[[ExpertSet], dict[str, torch.Tensor]], cfg: MergeSection,
                scales: Sequence[float] | None = None) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(new weights, new momenta) of the touched experts, each delta times its scale (default 1); the
    model itself is not changed here."""
    mean = WeightedMean()
    for i, (sub, verdict) in enumerate(accepted):  # arrival order: the sums run in the same order on every replay
        delta = decode(spool, sub, runtime)
        if scales is not None and scales[i] != 1.0:
            delta = {k: v * scales[i] for k, v in delta.items()}
        mean.add(delta, verdict.weight)
    mean_delta = mean.result()
    touched = ExpertSet.from_keys(mean_delta)
    base = {}
    for layer, expert in touched:
        base.update({k: v.detach().clone() for k, v in runtime.moe.expert_weights(layer, expert).items()})
    return outer_step(base, mean_delta, momentum(touched), cfg)


# Verdicts that say a miner worked on its domain this round (evaluated, within the guard): such a domain is
# held to its parent's loss at the merge even when none of its deltas was accepted.
WORKED = ("ok", "no_gain", "noise")


def guarded_scales(runtime: ModelRuntime, spool: Spool, accepted: list[tuple[SubmissionRow, VerdictRow]],
                   momentum: Callable[[ExpertSet], dict[str, torch.Tensor]], cfg: MergeSection, ev: RoundEval,
                   worked: set[str] = frozenset()) -> list[float]:
    """Scales that keep every scored domain within merge.max_regression of its parent (merge.interference_scales),
    measured on the round's rows; the verdicts' per-domain losses say which deltas hurt which domain."""
    if not ev.rows.domain_NL or any(v.cross is None for _, v in accepted):
        return [1.0] * len(accepted)

    def merged_losses(scales: list[float]) -> dict[str, float]:
        new_w, _ = merge_round(runtime, spool, accepted, momentum, cfg, scales)
        step = {k: w - runtime.moe.weight(k).detach() for k, w in new_w.items()}
        with applied(runtime.moe, step):
            return {d: float(row_losses(runtime.moe.model, r, ev.rows.batch_size).mean())
                    for d, r in sorted(ev.rows.domain_NL.items())}

    alone = [{d: after for d, (_, after) in v.cross.items()} for _, v in accepted]
    scales, _ = interference_scales(ev.base.domain, alone, [s.domain for s, _ in accepted], merged_losses,
                                    cfg.max_regression, cfg.regression_tries, worked)
    return scales


def publish_round(runtime: ModelRuntime, ledger: Ledger, spool: Spool, state_dir: Path, row: RoundRow,
                  accepted: list[tuple[SubmissionRow, VerdictRow]], cfg: MergeSection, clock_ms: int, ev: RoundEval,
                  before_rename: Callable[[], None] | None = None) -> Release:
    """Write version base+1 (checkpoint, manifest, momentum files); the caller commits it to the ledger."""
    refs = ledger.momentum_refs()
    momentum = lambda ex: load_momentum(state_dir, refs, ex)  # noqa: E731
    verdicts = ledger.verdicts(row.round)
    worked = {s.domain for s in ledger.submissions(row.round) if s.digest in verdicts
              and verdicts[s.digest].code in WORKED}
    scales = guarded_scales(runtime, spool, accepted, momentum, cfg, ev, worked) if cfg.regression_tries else None
    new_w, new_m = merge_round(runtime, spool, accepted, momentum, cfg, scales)
    with torch.no_grad():
        for key, w in new_w.items():
            runtime.moe.weight(key).copy_(w)
    new_refs = save_momentum(state_dir, row.round, new_m)
    parent = ledger.version(row.base_version)
    manifest = {"parent": row.base_version, "parent_manifest_sha256": parent.manifest_sha256, "round": row.round,
                "merge": {"outer_lr": cfg.outer_lr, "momentum": cfg.momentum, "nesterov": cfg.nesterov},
                "accepted": [{"submission": s.digest, "miner": s.miner, "domain": s.domain, "score": v.score,
                              "tokens": s.token_count, "weight": v.weight, "scale": scale,
                              "experts": s.experts.to_esft()}
                             for (s, v), scale in zip(accepted, scales or [1.0] * len(accepted))],
                "leaderboard": leaderboard_after(ledger, accepted)}
    version = row.base_version + 1
    directory = write_checkpoint(runtime.moe.model, runtime.tokenizer, runtime.checkpoints, version, manifest,
                                 before_rename)
    vrow = VersionRow(version=version, parent=row.base_version, round=row.round, dir=directory.name,
                      manifest_sha256=manifest_sha256(directory), published_ms=clock_ms)
    return Release(vrow, new_refs, directory)


def leaderboard_after(ledger: Ledger, accepted: list[tuple[SubmissionRow, VerdictRow]]) -> list[dict]:
    """Every miner's accepted count and total score once this round is published (the status table)."""
    board = {m: [n, s] for m, n, s in ledger.leaderboard()}
    for sub, verdict in accepted:
        entry = board.setdefault(sub.miner, [0, 0.0])
        entry[0] += 1
        entry[1] += verdict.score
    ranked = sorted(board.items(), key=lambda kv: (-kv[1][1], kv[0]))
    return [{"miner": m, "accepted": n, "total_score": s} for m, (n, s) in ranked]
