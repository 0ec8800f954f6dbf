"""Expert-delta codecs: fp32, bf16, int8 (blockwise absmax) and topk+int8 with error feedback.

Bytes in, bytes out, no file I/O; the math is kernels' (reference today, Triton with the same format
later). Each expert projection is flattened and cut into blocks of `block` entries:
  int8       q [N, B] int8, scale [N] fp32             x ≈ q * scale
  topk+int8  idx [N, K] int16, q [N, K] int8, scale [N]  the K largest |x| per block, quantized
Error feedback: the encoder returns the residual (what the sent delta lacks); the sender keeps it
and passes it back next round, so dropped or rounded mass is delayed, not lost.

Legend: N blocks, B block size, K kept entries per block.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Literal, Mapping

from pydantic import ConfigDict, Field
from pydantic.dataclasses import dataclass as pydantic_dataclass

import safetensors
import safetensors.torch
import torch

from expertmesh.kernels import reference as K
from expertmesh.protocol.delta_format import (CODECS, MAX_BLOCK, METADATA_KEY, MIN_BLOCK, PARTS, DeltaHeader, DeltaSpec,
                                   Expected, fail, expected_shape, read_container)
from expertmesh.protocol.errors import DeltaFormatError
from expertmesh.protocol.experts import ExpertSet, parse_expert_key, proj_shape

DEFAULT_MAX_BYTES = 4 << 30
_TORCH_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "I8": torch.int8, "I16": torch.int16}


@pydantic_dataclass(frozen=True, config=ConfigDict(extra="forbid"))
class CodecConfig:
    """How a delta is encoded; also the miner config's [codec] section, as it is (bounds checked by pydantic)."""

    codec: Literal[CODECS] = "int8"
    block: int = Field(256, ge=MIN_BLOCK, le=MAX_BLOCK)
    keep_fraction: float = Field(0.1, gt=0, le=1, description="topk+int8: share of each block's entries sent")

    @property
    def keep(self) -> int:
        return max(1, round(self.block * self.keep_fraction))


@dataclass(frozen=True)
class DeltaMeta:
    """What the sender states about the delta besides its tensors."""

    model_version: int
    token_count: int
    data_digest: str  # hex sha256 of the training data (see data_digest())


@dataclass(frozen=True)
class EncodedDelta:
    payload: bytes
    header: DeltaHeader
    residual: dict[str, torch.Tensor]  # keep and pass as `residual` next round; absent keys are zero


@dataclass(frozen=True)
class DecodedDelta:
    header: DeltaHeader
    tensors: dict[str, torch.Tensor]  # canonical key -> fp32, shapes as the receiver's model expects


def data_digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _header_for(delta: Mapping[str, torch.Tensor], meta: DeltaMeta, config: CodecConfig) -> DeltaHeader:
    if not delta:
        raise ValueError("empty delta: select at least one expert")
    dims: set[tuple[int, int]] = set()
    for key, t in delta.items():
        proj = parse_expert_key(key)[2]
        if t.dim() != 2:
            raise ValueError(f"{key} has shape {list(t.shape)}; expert projections are 2-D")
        dims.add(proj_shape(proj, t.shape[1], t.shape[0]))  # (I, H) for every projection: the rule is its own inverse
        if not torch.isfinite(t).all():
            raise ValueError(f"{key} has NaN or inf entries; fix training before encoding")
    if len(dims) != 1:
        raise ValueError(f"inconsistent expert shapes {sorted(dims)}: gate/up must be [I, H], down [H, I]")
    (inter, hidden), = dims
    dense = config.codec in ("fp32", "bf16")
    header = DeltaHeader(codec=config.codec, block=0 if dense else config.block,
                         keep=config.keep if config.codec == "topk+int8" else 0, model_version=meta.model_version,
                         token_count=meta.token_count, data_digest=meta.data_digest, hidden=hidden,
                         intermediate=inter, experts=ExpertSet.from_keys(delta))
    if set(header.keys()) != set(delta):
        raise ValueError("every selected expert needs all of gate_proj, up_proj and down_proj")
    return header


def _encode_one(x: torch.Tensor, header: DeltaHeader) -> dict[str, torch.Tensor]:
    if header.codec == "fp32":
        return {"": x.contiguous()}
    if header.codec == "bf16":
        return {"": x.to(torch.bfloat16).contiguous()}
    if header.codec == "int8":
        q_NB, scale_N = K.int8_blockwise_quantize(x, header.block)
        return {".q": q_NB.contiguous(), ".scale": scale_N.contiguous()}
    idx_NK, val_NK = K.topk_blockwise(x, header.block, header.keep)
    q_NK, scale_N = K.int8_blockwise_quantize(val_NK, header.keep)  # one scale per block: rows of K
    return {".idx": idx_NK.contiguous(), ".q": q_NK.contiguous(), ".scale": scale_N.contiguous()}


def _decode_one(parts: dict[str, torch.Tensor], header: DeltaHeader, shape: tuple[int, ...]) -> torch.Tensor:
    if header.codec in ("fp32", "bf16"):
        return parts[""].float()
    if header.codec == "int8":
        return K.int8_blockwise_dequantize(parts[".q"], parts[".scale"], shape)
    val_NK = K.int8_blockwise_dequantize(parts[".q"], parts[".scale"], tuple(parts[".q"].shape))
    return K.topk_blockwise_scatter(parts[".idx"], val_NK, header.block, shape)


def encode_delta(delta: Mapping[str, torch.Tensor], meta: DeltaMeta, config: CodecConfig = CodecConfig(),
                 residual: Mapping[str, torch.Tensor] | None = None) -> EncodedDelta:
    """Encode `delta` (canonical key -> fp32 [I, H] / [H, I]) plus last round's residual."""
    header = _header_for(delta, meta, config)
    residual = dict(residual or {})
    tensors: dict[str, torch.Tensor] = {}
    for key in header.keys():
        x = delta[key].detach().float().cpu()
        if key in residual:
            x = x + residual.pop(key).float().cpu()
        parts = _encode_one(x, header)
        tensors.update({key + s: t for s, t in parts.items()})
        if config.codec != "fp32":
            residual[key] = x - _decode_one(parts, header, tuple(x.shape))
    payload = safetensors.torch.save(tensors, metadata={METADATA_KEY: header.to_json()})
    return EncodedDelta(payload=payload, header=header, residual=residual)


def read_delta_header(payload: bytes, max_bytes: int = DEFAULT_MAX_BYTES) -> DeltaHeader:
    """The header of a delta whose structure is valid; tensors are not decoded."""
    return read_container(payload, max_bytes).header


def decode_delta(payload: bytes, expected: Expected, max_bytes: int = DEFAULT_MAX_BYTES) -> DecodedDelta:
    """Check everything against the receiver's model and decode to fp32; DeltaFormatError otherwise."""
    container = read_container(payload, max_bytes)
    header = container.header
    for key in header.keys():
        want = expected_shape(expected, key)
        got = header.shape(parse_expert_key(key)[2])
        if want is None:
            fail(f"{key} is not an expert of the receiver's model")
        if tuple(want) != got:
            fail(f"{key} has shape {list(got)}, the receiver's model has {list(want)}")
    try:
        raw = safetensors.torch.load(payload)
    except safetensors.SafetensorError as exc:
        raise DeltaFormatError(f"invalid delta: safetensors could not read it ({exc})") from None
    if raw.keys() != container.entries.keys():
        fail("safetensors tensors differ from its header")
    tensors: dict[str, torch.Tensor] = {}
    for key in header.keys():
        parts = {s: raw[key + s] for s in PARTS[header.codec]}
        for s, t in parts.items():  # what safetensors built must be what its header (checked above) said
            dtype, shape = container.entries[key + s]
            if tuple(t.shape) != shape or t.dtype != _TORCH_DTYPES[dtype]:
                fail(f"{key + s} differs from the safetensors header")
        _check_values(key, parts, header)
        out = _decode_one(parts, header, header.shape(parse_expert_key(key)[2]))
        if not torch.isfinite(out).all():
            fail(f"{key} decodes to NaN or inf")
        tensors[key] = out
    return DecodedDelta(header=header, tensors=tensors)


def _check_values(key: str, parts: dict[str, torch.Tensor], header: DeltaHeader) -> None:
    if "" in parts and not torch.isfinite(parts[""].float()).all():
        fail(f"{key} has NaN or inf entries")
    if ".scale" in parts:
        scale_N = parts[".scale"]
        if not torch.isfinite(scale_N).all() or (scale_N < 0).any():
            fail(f"{key}.scale must be finite and >= 0")
    if ".idx" in parts:
        idx_NK = parts[".idx"].long()
        if (idx_NK < 0).any() or (idx_NK >= header.block).any() or (idx_NK[:, 1:] <= idx_NK[:, :-1]).any():
            fail(f"{key}.idx must be strictly increasing positions within [0, {header.block})")


__all__ = ["CodecConfig", "DeltaMeta", "DeltaSpec", "EncodedDelta", "DecodedDelta", "DeltaFormatError", "encode_delta",
           "decode_delta", "read_delta_header", "data_digest"]
