"""Triton delta coding: (trained − base) of the selected experts → blockwise int8 or top-k, one pass.

Legend: S selected experts (compact slots), E experts, X one expert's tensor (flattened, X elements),
B quantization block, N = cdiv(X, B) blocks per expert, KEEP entries kept per block by top-k.

One program reads one block of one expert from the trained compact tensor and from the base, keeps
everything in registers, and writes the coded block and (optionally) the new error-feedback
residual. The output is bit-identical to kernels.reference.delta_quantize, which composes the
protocol codec's reference functions: divisions are IEEE-rounded (div_rn) and rounding is
half-to-even, like torch.round. Top-k ties are broken towards the lower index.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _load_block(trained_ptr, base_ptr, ids_ptr, ef_ptr, st_s, sb_e, NUMEL, BLOCK,
                BLOCK_P2: tl.constexpr, HAS_EF: tl.constexpr):
    b = tl.program_id(0)
    s = tl.program_id(1)
    lane = tl.arange(0, BLOCK_P2)
    offs = b.to(tl.int64) * BLOCK + lane
    in_tensor = (lane < BLOCK) & (offs < NUMEL)
    e = tl.load(ids_ptr + s).to(tl.int64)
    t = tl.load(trained_ptr + s.to(tl.int64) * st_s + offs, mask=in_tensor, other=0.0).to(tl.float32)
    w = tl.load(base_ptr + e * sb_e + offs, mask=in_tensor, other=0.0).to(tl.float32)
    v = t - w
    ef_ptrs = ef_ptr + s.to(tl.int64) * NUMEL + offs
    if HAS_EF:
        v += tl.load(ef_ptrs, mask=in_tensor, other=0.0)
    return v, lane, in_tensor, ef_ptrs


@triton.jit
def delta_int8_kernel(trained_ptr, base_ptr, ids_ptr, ef_ptr, q_ptr, scale_ptr, st_s, sb_e, NUMEL, N_BLOCKS,
                      BLOCK, BLOCK_P2: tl.constexpr, HAS_EF: tl.constexpr):
    v, lane, in_tensor, ef_ptrs = _load_block(trained_ptr, base_ptr, ids_ptr, ef_ptr, st_s, sb_e, NUMEL, BLOCK,
                                              BLOCK_P2, HAS_EF)
    blk = tl.program_id(1).to(tl.int64) * N_BLOCKS + tl.program_id(0)
    scale = tl.math.div_rn(tl.max(tl.abs(v), axis=0), 127.0)
    safe = tl.where(scale > 0, scale, 1.0)
    r = tl.math.div_rn(v, tl.zeros_like(v) + safe)
    f = tl.floor(r)
    odd = f - 2.0 * tl.floor(f * 0.5)
    r = tl.where(r - f > 0.5, f + 1.0, tl.where(r - f < 0.5, f, f + odd))
    q = tl.minimum(tl.maximum(r, -127.0), 127.0)
    tl.store(q_ptr + blk * BLOCK + lane, q.to(tl.int8), mask=lane < BLOCK)
    tl.store(scale_ptr + blk, scale)
    if HAS_EF:
        tl.store(ef_ptrs, v - q * scale, mask=in_tensor)


@triton.jit
def delta_topk_kernel(trained_ptr, base_ptr, ids_ptr, ef_ptr, idx_ptr, val_ptr, st_s, sb_e, NUMEL, N_BLOCKS,
                      BLOCK, KEEP, BLOCK_P2: tl.constexpr, HAS_EF: tl.constexpr):
    v, lane, in_tensor, ef_ptrs = _load_block(trained_ptr, base_ptr, ids_ptr, ef_ptr, st_s, sb_e, NUMEL, BLOCK,
                                              BLOCK_P2, HAS_EF)
    blk = tl.program_id(1).to(tl.int64) * N_BLOCKS + tl.program_id(0)
    # |v| as int32 orders like |v| itself, so the KEEP-th largest magnitude is found bit by bit
    # from the top (radix select), without sorting. Lanes past the block can never be picked.
    bits = tl.where(lane < BLOCK, tl.abs(v).to(tl.int32, bitcast=True), -1)
    thr = tl.zeros((), dtype=tl.int32)
    for i in tl.static_range(31):
        cand = thr | (1 << (30 - i))
        thr = tl.where(tl.sum((bits >= cand).to(tl.int32), axis=0) >= KEEP, cand, thr)
    above = bits > thr
    tie = bits == thr
    tie_rank = tl.cumsum(tie.to(tl.int32), axis=0)
    take = above | (tie & (tie_rank <= KEEP - tl.sum(above.to(tl.int32), axis=0)))
    pos = blk * KEEP + tl.cumsum(take.to(tl.int32), axis=0) - 1   # ascending in-block index order
    tl.store(idx_ptr + pos, lane.to(tl.int16), mask=take)
    tl.store(val_ptr + pos, v, mask=take)
    if HAS_EF:
        tl.store(ef_ptrs, tl.where(take, 0.0, v), mask=in_tensor)


def delta_quantize_triton(
    trained_SX: torch.Tensor,
    base_EX: torch.Tensor,
    expert_ids_S: torch.Tensor,
    block: int,
    keep: int | None = None,
    ef_SX: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as kernels.reference.delta_quantize; the dispatcher validates arguments first."""
    S, X = trained_SX.shape[0], trained_SX[0].numel()
    n = max(1, triton.cdiv(X, block))
    dev = trained_SX.device
    ids = expert_ids_S.to(device=dev, dtype=torch.int64).contiguous()
    ef = ef_SX if ef_SX is not None else trained_SX   # placeholder pointer, never read without HAS_EF
    common = dict(BLOCK_P2=triton.next_power_of_2(block), HAS_EF=ef_SX is not None)
    grid = (n, S)
    if keep is None:
        q_SNB = torch.empty(S, n, block, dtype=torch.int8, device=dev)
        scale_SN = torch.empty(S, n, dtype=torch.float32, device=dev)
        delta_int8_kernel[grid](trained_SX, base_EX, ids, ef, q_SNB, scale_SN, trained_SX.stride(0),
                                base_EX.stride(0), X, n, block, **common)
        return q_SNB, scale_SN
    idx_SNK = torch.empty(S, n, keep, dtype=torch.int16, device=dev)
    val_SNK = torch.empty(S, n, keep, dtype=torch.float32, device=dev)
    delta_topk_kernel[grid](trained_SX, base_EX, ids, ef, idx_SNK, val_SNK, trained_SX.stride(0),
                            base_EX.stride(0), X, n, block, keep, **common)
    return idx_SNK, val_SNK
