"""The delta container: safetensors bytes plus a JSON header in its metadata, read strictly.

Received files are parsed here before any tensor is materialised: the safetensors header is bounded
and checked as JSON, our header (metadata key "expertmesh") is checked field by field, and tensor
names are grouped by canonical expert key. Tensors themselves only ever come from safetensors;
never pickle, never torch.load.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Mapping

from expertmesh.protocol.errors import DeltaFormatError
from expertmesh.protocol.experts import ExpertSet, parse_expert_key, proj_shape
from expertmesh.protocol.types import INT_MAX

FORMAT = "expertmesh-delta/2"  # 2: experts is the ExpertSet object (ESFT form)
METADATA_KEY = "expertmesh"
CODECS = ("fp32", "bf16", "int8", "topk+int8")
# tensor parts per codec: suffix -> safetensors dtype ("" is the canonical name itself)
PARTS = {"fp32": {"": "F32"}, "bf16": {"": "BF16"}, "int8": {".q": "I8", ".scale": "F32"},
         "topk+int8": {".idx": "I16", ".q": "I8", ".scale": "F32"}}
ITEMSIZE = {"F32": 4, "BF16": 2, "F16": 2, "I8": 1, "I16": 2}
MIN_BLOCK, MAX_BLOCK = 16, 32768  # top-k positions are int16
MAX_HEADER_BYTES = 64 << 20
_HEADER_KEYS = {"format", "codec", "block", "keep", "model_version", "token_count", "data_digest", "hidden",
                "intermediate", "experts"}
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_SUFFIX = re.compile(r"(.*?)(\.q|\.scale|\.idx)?", re.DOTALL)


def fail(message: str) -> None:
    raise DeltaFormatError(f"invalid delta: {message}")


@dataclass(frozen=True)
class DeltaSpec:
    """The receiver's model: which expert tensors exist and their shapes (gate/up [I, H], down [H, I])."""

    num_layers: int
    num_experts: int
    hidden: int
    intermediate: int

    def shape_of(self, key: str) -> tuple[int, ...] | None:
        layer, expert, proj = parse_expert_key(key)
        if layer >= self.num_layers or expert >= self.num_experts:
            return None
        return proj_shape(proj, self.hidden, self.intermediate)


Expected = DeltaSpec | Mapping[str, tuple[int, ...]]


def expected_shape(expected: Expected, key: str) -> tuple[int, ...] | None:
    if isinstance(expected, DeltaSpec):
        return expected.shape_of(key)
    shape = expected.get(key)
    return None if shape is None else tuple(shape)


@dataclass(frozen=True)
class DeltaHeader:
    codec: str
    block: int  # quantization block (0 for fp32/bf16)
    keep: int  # entries kept per block (topk+int8 only, else 0)
    model_version: int
    token_count: int
    data_digest: str  # hex sha256 of the data the delta was trained on
    hidden: int
    intermediate: int
    experts: ExpertSet

    def to_json(self) -> str:
        return json.dumps({"format": FORMAT, "codec": self.codec, "block": self.block, "keep": self.keep,
                           "model_version": self.model_version, "token_count": self.token_count,
                           "data_digest": self.data_digest, "hidden": self.hidden, "intermediate": self.intermediate,
                           "experts": self.experts.to_esft()}, sort_keys=True)

    def shape(self, proj: str) -> tuple[int, int]:
        return proj_shape(proj, self.hidden, self.intermediate)

    def part_shapes(self, proj: str) -> dict[str, tuple[int, ...]]:
        """The stored shape of each tensor part of one projection under this header's codec."""
        shape = self.shape(proj)
        if self.codec in ("fp32", "bf16"):
            return {"": shape}
        n_blocks = max(1, math.ceil(math.prod(shape) / self.block))
        width = self.block if self.codec == "int8" else self.keep
        parts = {".q": (n_blocks, width), ".scale": (n_blocks,)}
        return {".idx": (n_blocks, width), **parts} if self.codec == "topk+int8" else parts

    def keys(self) -> list[str]:
        return self.experts.keys()


def _int(d: dict, name: str, lo: int, hi: int) -> int:
    v = d.get(name)
    if type(v) is not int or not lo <= v <= hi:
        fail(f"header field {name!r} must be an integer in [{lo}, {hi}], got {v!r}")
    return v


def parse_header(text: str) -> DeltaHeader:
    try:
        d = json.loads(text)
    except (ValueError, RecursionError):
        fail("the expertmesh header is not JSON")
    if not isinstance(d, dict) or set(d) != _HEADER_KEYS:
        fail(f"the expertmesh header must have exactly the fields {sorted(_HEADER_KEYS)}")
    if d["format"] != FORMAT:
        fail(f"format {d['format']!r} is not {FORMAT!r}")
    if d["codec"] not in CODECS:
        fail(f"codec {d['codec']!r} is not one of {CODECS}")
    codec = d["codec"]
    dense = codec in ("fp32", "bf16")
    block = _int(d, "block", 0, 0) if dense else _int(d, "block", MIN_BLOCK, MAX_BLOCK)
    keep = _int(d, "keep", 1, block) if codec == "topk+int8" else _int(d, "keep", 0, 0)
    if not isinstance(d["data_digest"], str) or not _HEX64.match(d["data_digest"]):
        fail("data_digest must be 64 lowercase hex characters (a sha256)")
    try:
        experts = ExpertSet.from_json(d["experts"])
    except ValueError as exc:
        fail(str(exc))
    return DeltaHeader(codec=codec, block=block, keep=keep, model_version=_int(d, "model_version", 0, INT_MAX),
                       token_count=_int(d, "token_count", 0, INT_MAX), data_digest=d["data_digest"],
                       hidden=_int(d, "hidden", 1, 1 << 20), intermediate=_int(d, "intermediate", 1, 1 << 20),
                       experts=experts)


@dataclass(frozen=True)
class Container:
    """A parsed but not yet materialised delta: our header and the safetensors tensor index."""

    header: DeltaHeader
    entries: dict[str, tuple[str, tuple[int, ...]]]  # tensor name -> (dtype, shape)
    payload_bytes: int


def read_container(payload: bytes, max_bytes: int) -> Container:
    """Parse and check the container's structure: every name, dtype and shape follows the header."""
    if len(payload) > max_bytes:
        fail(f"{len(payload)} bytes exceeds the limit of {max_bytes}")
    if len(payload) < 10:
        fail("too short to be a safetensors file")
    n = int.from_bytes(payload[:8], "little")
    if not 2 <= n <= min(len(payload) - 8, MAX_HEADER_BYTES):
        fail("safetensors header length is out of range")
    try:
        index = json.loads(payload[8:8 + n])
    except (ValueError, RecursionError):
        fail("safetensors header is not JSON")
    if not isinstance(index, dict):
        fail("safetensors header is not a JSON object")
    meta = index.pop("__metadata__", None)
    if not isinstance(meta, dict) or not isinstance(meta.get(METADATA_KEY), str):
        fail(f"safetensors metadata has no {METADATA_KEY!r} header; was this written by protocol.codec?")
    header = parse_header(meta[METADATA_KEY])
    entries: dict[str, tuple[str, tuple[int, ...]]] = {}
    for name, e in index.items():
        if not isinstance(e, dict) or not isinstance(e.get("dtype"), str) or not isinstance(e.get("shape"), list) \
                or any(type(s) is not int or s < 0 for s in e["shape"]):
            fail(f"tensor entry {name[:100]!r} is malformed")
        entries[name] = (e["dtype"], tuple(e["shape"]))
    _check_names(header, entries)
    return Container(header=header, entries=entries, payload_bytes=len(payload))


def _check_names(header: DeltaHeader, entries: dict[str, tuple[str, tuple[int, ...]]]) -> None:
    parts = PARTS[header.codec]
    found: dict[str, set[str]] = {}
    for name in entries:
        base, suffix = _SUFFIX.fullmatch(name).groups()
        suffix = suffix or ""
        try:
            parse_expert_key(base)
        except ValueError as exc:
            fail(f"tensor {name[:100]!r}: {exc}")
        if suffix not in parts:
            fail(f"tensor {name[:100]!r} is not a part of codec {header.codec!r} (parts: {sorted(parts)})")
        found.setdefault(base, set()).add(suffix)
    declared = set(header.keys())
    if set(found) != declared:
        extra, missing = sorted(set(found) - declared), sorted(declared - set(found))
        fail(f"tensors do not match the declared experts (undeclared: {extra[:3]}, missing: {missing[:3]}); "
              "every declared expert needs gate_proj, up_proj and down_proj")
    for base, suffixes in found.items():
        if suffixes != set(parts):
            fail(f"{base} has parts {sorted(suffixes)}, codec {header.codec!r} needs {sorted(parts)}")
        want = header.part_shapes(parse_expert_key(base)[2])
        for suffix, dtype in parts.items():
            got_dtype, got_shape = entries[base + suffix]
            if got_dtype != dtype or got_shape != want[suffix]:
                fail(f"{base + suffix} is {got_dtype}{list(got_shape)}, expected {dtype}{list(want[suffix])}")
