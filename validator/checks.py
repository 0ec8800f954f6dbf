"""Checks on a decoded delta before it is scored. Tensors in, a verdict or numbers out; no I/O.

The codec verifies what the payload says of itself (declared experts, shapes against the model,
finite values; protocol.codec.decode_delta); these checks add what only this validator knows: the
delta was trained on the round's base version, and no expert moves by more than a configured
fraction of its own weight norm (a cheap bound on how far one miner can push it).
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from expertmesh.node.moe import MoEModel
from expertmesh.protocol.experts import ExpertSet, parse_expert_key


class CheckFailed(ValueError):
    """A delta that must not be scored: a short code (the ledger's verdicts.code) and why, for people."""

    def __init__(self, code: str, message: str):
        super().__init__(f"{code}: {message}")
        self.code, self.message = code, message


@dataclass(frozen=True)
class CheckedDelta:
    tensors: dict[str, torch.Tensor]
    experts: ExpertSet
    norm: float  # ‖Δ‖ over all tensors
    relative_norm: float  # ‖Δ‖ / ‖W‖ over the touched experts
    max_expert_ratio: float  # max over experts of ‖Δ_e‖ / ‖W_e‖


def expert_norms(moe: MoEModel) -> dict[tuple[int, int], float]:
    """‖W_e‖ (Frobenius, over gate, up and down) of every expert; computed once per model version."""
    out = {}
    for lay in moe.layers:
        gu_sq_E = lay.experts.gate_up_proj.detach().double().pow(2).sum(dim=(1, 2))
        down_sq_E = lay.experts.down_proj.detach().double().pow(2).sum(dim=(1, 2))
        for e, sq in enumerate((gu_sq_E + down_sq_E).tolist()):
            out[(lay.index, e)] = math.sqrt(sq)
    return out


def check_delta(tensors: Mapping[str, torch.Tensor], model_version: int, base_version: int,
                weight_norms: Mapping[tuple[int, int], float], max_update_ratio: float) -> CheckedDelta:
    """What only the validator can know: the round's version, and each expert's move against its weights.

    Declared experts, shapes, dtype and finiteness are protocol.codec.decode_delta's to verify (it
    refuses the payload otherwise); `tensors` are what it returned.
    """
    if model_version != base_version:
        raise CheckFailed("version", f"delta was trained on version {model_version}, this round's base is {base_version}")
    sq: dict[tuple[int, int], float] = {}
    for key, t in sorted(tensors.items()):
        layer, expert, _ = parse_expert_key(key)
        sq[(layer, expert)] = sq.get((layer, expert), 0.0) + float(t.double().pow(2).sum())
    ratios = {le: math.sqrt(s) / max(weight_norms[le], 1e-12) for le, s in sq.items()}
    worst = max(ratios, key=lambda le: (ratios[le], le))
    if ratios[worst] > max_update_ratio:
        raise CheckFailed("norm_cap", f"expert {worst[0]}.{worst[1]} moves by {ratios[worst]:.3g} of its weight "
                                      f"norm, over the cap of {max_update_ratio}")
    norm = math.sqrt(sum(sq.values()))
    w_norm = math.sqrt(sum(weight_norms[le] ** 2 for le in sq))
    return CheckedDelta(dict(tensors), ExpertSet(sq), norm, norm / max(w_norm, 1e-12), ratios[worst])
