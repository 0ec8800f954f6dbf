"""Experts and their tensors: the one vocabulary of the wire, delta files, the ledger and every node.

An expert is addressed by (layer, expert). On the wire and in delta files each expert is three
tensors in the per-expert layout transformers writes on disk:
  layers.<l>.experts.<e>.gate_proj  [I, H]
  layers.<l>.experts.<e>.up_proj    [I, H]
  layers.<l>.experts.<e>.down_proj  [H, I]
A set of experts (a selection, what a delta touches) is an ExpertSet; wherever it is stored or sent
it is ESFT's JSON object {"experts": {"<layer>": [sorted ids]}, "shared_experts": false,
"non_expert_modules": false}, never JSON inside a string.
"""
from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping

PROJS = ("gate_proj", "up_proj", "down_proj")
MAX_INDEX = 999_999  # six digits, as the names allow
_KEY = re.compile(r"^layers\.(0|[1-9][0-9]{0,5})\.experts\.(0|[1-9][0-9]{0,5})\.(gate_proj|up_proj|down_proj)$")
_LAYER = re.compile(r"^(0|[1-9][0-9]{0,5})$")


def expert_key(layer: int, expert: int, proj: str) -> str:
    assert proj in PROJS, proj
    return f"layers.{layer}.experts.{expert}.{proj}"


def expert_keys(layer: int, expert: int) -> list[str]:
    """The three canonical tensor names of one expert (gate, up, down)."""
    return [expert_key(layer, expert, p) for p in PROJS]


def parse_expert_key(key: str) -> tuple[int, int, str]:
    """(layer, expert, proj) of a canonical name; ValueError for anything else."""
    m = _KEY.fullmatch(key) if isinstance(key, str) else None  # fullmatch: '$' would accept a trailing newline
    if m is None:
        raise ValueError(f"not a canonical expert tensor name: {key!r} (want layers.<l>.experts.<e>.<gate_proj|up_proj|down_proj>)")
    return int(m.group(1)), int(m.group(2)), m.group(3)


def proj_shape(proj: str, hidden: int, intermediate: int) -> tuple[int, int]:
    """The shape of one expert projection: gate/up [I, H], down [H, I]."""
    assert proj in PROJS, proj
    return (hidden, intermediate) if proj == "down_proj" else (intermediate, hidden)


class ExpertSet:
    """A frozen set of (layer, expert); iterates in sorted order. Construction validates every index."""

    __slots__ = ("_pairs", "_set")

    def __init__(self, pairs: Iterable[tuple[int, int]] = ()):
        items = set()
        for pair in pairs:
            if not (isinstance(pair, tuple) and len(pair) == 2
                    and all(type(i) is int and 0 <= i <= MAX_INDEX for i in pair)):
                raise ValueError(f"an expert is a (layer, expert) pair of integers in [0, {MAX_INDEX}], not {pair!r}")
            items.add(pair)
        self._pairs = tuple(sorted(items))
        self._set = frozenset(items)

    @classmethod
    def from_layers(cls, layers: Mapping[int, Iterable[int]]) -> ExpertSet:
        """From {layer: expert ids}, e.g. {0: [1, 3]}."""
        return cls((l, e) for l, ids in layers.items() for e in ids)

    @classmethod
    def from_keys(cls, keys: Iterable[str]) -> ExpertSet:
        """The experts that canonical tensor names belong to (ValueError for any other name)."""
        return cls(parse_expert_key(k)[:2] for k in keys)

    @classmethod
    def from_json(cls, doc: object) -> ExpertSet:
        """Strictly the stored form (what to_esft writes): received or stored documents, not hand-written files."""
        if not (isinstance(doc, dict) and set(doc) == {"experts", "shared_experts", "non_expert_modules"}
                and doc["shared_experts"] is False and doc["non_expert_modules"] is False):
            raise ValueError('experts must be {"experts": {...}, "shared_experts": false, "non_expert_modules": false}')
        obj = doc["experts"]
        if not isinstance(obj, dict) or not obj:
            raise ValueError('experts must name at least one layer: {"experts": {"<layer>": [expert ids]}, ...}')
        pairs = []
        for layer, ids in obj.items():
            if not (isinstance(layer, str) and _LAYER.fullmatch(layer)):
                raise ValueError(f"experts: layer {layer!r} is not a decimal integer")
            if not isinstance(ids, list) or not ids or any(type(i) is not int or not 0 <= i <= MAX_INDEX for i in ids) \
                    or ids != sorted(set(ids)):
                raise ValueError(f"experts[{layer}] must be a non-empty strictly increasing list of expert ids")
            pairs += [(int(layer), e) for e in ids]
        return cls(pairs)

    @classmethod
    def from_esft(cls, doc: object) -> ExpertSet:
        """A hand-written or ESFT-made experts.json: ids in any order; absent flags mean false."""
        try:
            experts = cls.from_layers({int(l): [int(e) for e in ids] for l, ids in doc["experts"].items()})
        except (KeyError, TypeError, ValueError, AttributeError):
            raise ValueError('not an ESFT experts file: want {"experts": {"<layer>": [ids]}, ...}') from None
        if doc.get("shared_experts") or doc.get("non_expert_modules"):
            raise ValueError("training shared experts or non-expert modules is not supported; set both flags to false")
        if not experts:
            raise ValueError("experts file selects no experts")
        return experts

    def to_esft(self) -> dict:
        """The stored form: ESFT's experts.json object, layers and ids in order."""
        return {"experts": {str(l): list(ids) for l, ids in self.layers().items()}, "shared_experts": False,
                "non_expert_modules": False}

    def layers(self) -> dict[int, tuple[int, ...]]:
        """{layer: sorted expert ids}, layers in order; only layers with an expert."""
        out: dict[int, tuple[int, ...]] = {}
        for l, e in self._pairs:
            out[l] = out.get(l, ()) + (e,)
        return out

    def keys(self) -> list[str]:
        """Canonical tensor names of every expert, in order (gate, up, down per expert)."""
        return [k for l, e in self._pairs for k in expert_keys(l, e)]

    shape = staticmethod(proj_shape)

    def jaccard(self, other: ExpertSet) -> float:
        union = self._set | other._set
        return len(self._set & other._set) / len(union) if union else 1.0

    def __or__(self, other: ExpertSet) -> ExpertSet:
        return ExpertSet(self._set | other._set)

    def __and__(self, other: ExpertSet) -> ExpertSet:
        return ExpertSet(self._set & other._set)

    def __sub__(self, other: ExpertSet) -> ExpertSet:
        return ExpertSet(self._set - other._set)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return iter(self._pairs)

    def __len__(self) -> int:
        return len(self._pairs)

    def __contains__(self, pair: object) -> bool:
        return pair in self._set

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ExpertSet) and self._set == other._set

    def __hash__(self) -> int:
        return hash(self._set)

    def __repr__(self) -> str:
        return f"ExpertSet({self.layers()})"
