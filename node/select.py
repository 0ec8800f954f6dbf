"""ESFT expert selection from a routing profile (profile dict in, ExpertSet out).

Per layer, each expert's score is normalised per token: token score = count / (N·k), gate score =
gate_sum / N. Experts are taken in descending score order until the cumulative score reaches p; the
expert that crosses p is included. Then min/max per layer apply.
"""
from __future__ import annotations

from expertmesh.node.defaults import DEFAULT_P
from expertmesh.protocol.experts import ExpertSet


class SelectionError(ValueError):
    """A profile or selection request that cannot be honoured."""


def layer_scores(profile: dict, score: str = "token") -> dict[int, list[float]]:
    if score not in ("token", "gate"):
        raise SelectionError(f"--score must be 'token' or 'gate', not {score!r}")
    try:
        n, k, layers = int(profile["tokens"]), int(profile["top_k"]), profile["layers"]
        if n <= 0:
            raise SelectionError("the profile saw no tokens; profile more data")
        if score == "token":
            return {int(l): [c / (n * k) for c in st["counts"]] for l, st in layers.items()}
        return {int(l): [g / n for g in st["gate_sum"]] for l, st in layers.items()}
    except (KeyError, TypeError, AttributeError) as exc:
        raise SelectionError(f"not a routing profile (missing or malformed {exc}); make one with `expertmesh profile`") from None


def select_experts(profile: dict, score: str = "token", p: float = DEFAULT_P, min_per_layer: int = 1,
                   max_per_layer: int | None = None) -> ExpertSet:
    if not 0 < p <= 1:
        raise SelectionError(f"--p must be in (0, 1], got {p}")
    if min_per_layer < 0 or (max_per_layer is not None and max_per_layer < max(1, min_per_layer)):
        raise SelectionError(f"need 0 <= --min-per-layer <= --max-per-layer (got {min_per_layer}, {max_per_layer})")
    chosen = {}
    for layer, scores in sorted(layer_scores(profile, score).items()):
        order = sorted(range(len(scores)), key=lambda e: (-scores[e], e))
        picked, total = [], 0.0
        for e in order:
            if total >= p:
                break
            picked.append(e)
            total += scores[e]
        if len(picked) < min_per_layer:
            picked = order[:min_per_layer]
        if max_per_layer is not None:
            picked = picked[:max_per_layer]
        chosen[layer] = picked
    return ExpertSet.from_layers(chosen)


def read_esft(doc: object, moe=None) -> ExpertSet:
    """Parse ESFT's experts.json; with `moe`, check every layer and expert exists in that model."""
    try:
        experts = ExpertSet.from_esft(doc)
    except ValueError as exc:
        raise SelectionError(str(exc)) from None
    if moe is not None:
        sizes = {lay.index: lay.num_experts for lay in moe.layers}
        for l, ids in experts.layers().items():
            if l not in sizes:
                raise SelectionError(f"experts file names layer {l}, which is not an MoE layer of the model (MoE layers: {sorted(sizes)})")
            bad = [e for e in ids if not e < sizes[l]]
            if bad:
                raise SelectionError(f"experts file names expert(s) {bad} in layer {l}; the model has experts 0..{sizes[l] - 1}")
    return experts
