"""Plain-PyTorch references: the CPU path and the test oracle for every Triton kernel.

Legend: T tokens, K top-k, E experts, S selected (trainable) experts, H hidden, I expert
intermediate size, B quantization block, N blocks.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def expert_ffn(
    x_TH: torch.Tensor,
    topk_idx_TK: torch.Tensor,
    topk_w_TK: torch.Tensor,
    w_gate_up_E2IH: torch.Tensor,
    w_down_EHI: torch.Tensor,
    trainable_ids_S: torch.Tensor | None = None,
    w_gate_up_S2IH: torch.Tensor | None = None,
    w_down_SHI: torch.Tensor | None = None,
) -> torch.Tensor:
    """Routed SwiGLU experts, y = sum_k w_tk * down_e(silu(gate_e x) * up_e x).

    gate_up is the concatenated [gate; up] layout transformers uses. Expert e = trainable_ids[s]
    takes its weights from the compact trainable tensors at s; every other expert uses the base
    tensors, which autograd sees only as constants when they do not require grad.
    On CPU with torch's grouped GEMM (fp32/fp16/bf16) this runs as two grouped matmuls, ~15x faster
    than the per-expert loop on small models; elsewhere (fp64, CUDA, older torch) it is the loop.
    A trainable expert that gets no token has a zero gradient on the grouped path and none on the loop.
    """
    if _grouped_mm_ok(x_TH, w_down_EHI):
        return _expert_ffn_grouped(x_TH, topk_idx_TK, topk_w_TK, w_gate_up_E2IH, w_down_EHI,
                                   trainable_ids_S, w_gate_up_S2IH, w_down_SHI)
    return expert_ffn_loop(x_TH, topk_idx_TK, topk_w_TK, w_gate_up_E2IH, w_down_EHI,
                           trainable_ids_S, w_gate_up_S2IH, w_down_SHI)


def _grouped_mm_ok(x_TH: torch.Tensor, w_down_EHI: torch.Tensor) -> bool:
    # CPU grouped_mm wants every row stride a multiple of 16 bytes, and before torch 2.11 also
    # 16-byte-aligned pointers (memory-mapped checkpoints are not); CUDA goes to Triton instead.
    version = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2])
    H, I = w_down_EHI.shape[1:]
    return (x_TH.device.type == "cpu" and hasattr(torch, "_grouped_mm") and version >= (2, 11)
            and x_TH.dtype in (torch.float32, torch.float16, torch.bfloat16)
            and (H * x_TH.element_size()) % 16 == 0 and (I * x_TH.element_size()) % 16 == 0)


def _expert_ffn_grouped(x_TH, topk_idx_TK, topk_w_TK, w_gu_E2IH, w_d_EHI, ids_S, w_gu_S2IH, w_d_SHI):
    T, K = topk_idx_TK.shape
    E = w_gu_E2IH.shape[0]
    if ids_S is not None:
        # Out-of-place, so autograd carries the gradient of the replaced rows to the compact tensors.
        w_gu_E2IH = w_gu_E2IH.index_copy(0, ids_S.to(x_TH.device), w_gu_S2IH)
        w_d_EHI = w_d_EHI.index_copy(0, ids_S.to(x_TH.device), w_d_SHI)
    flat_P = topk_idx_TK.reshape(-1)
    perm_P = torch.argsort(flat_P, stable=True)   # rows by expert, token order inside, as the loop
    tok_P = perm_P // K
    offs_E = torch.cumsum(torch.bincount(flat_P, minlength=E), 0).to(torch.int32)
    gate, up = torch._grouped_mm(x_TH[tok_P], w_gu_E2IH.transpose(1, 2), offs=offs_E).chunk(2, dim=-1)
    out_PH = torch._grouped_mm(F.silu(gate) * up, w_d_EHI.transpose(1, 2), offs=offs_E)
    out_PH = out_PH * topk_w_TK.reshape(-1)[perm_P, None]
    y_TH = torch.zeros(T, x_TH.shape[1], dtype=torch.float32, device=x_TH.device).index_add(0, tok_P, out_PH.float())
    return y_TH.to(x_TH.dtype)


def expert_ffn_loop(
    x_TH: torch.Tensor,
    topk_idx_TK: torch.Tensor,
    topk_w_TK: torch.Tensor,
    w_gate_up_E2IH: torch.Tensor,
    w_down_EHI: torch.Tensor,
    trainable_ids_S: torch.Tensor | None = None,
    w_gate_up_S2IH: torch.Tensor | None = None,
    w_down_SHI: torch.Tensor | None = None,
) -> torch.Tensor:
    """expert_ffn as a plain per-expert loop: any dtype and device, and the oracle of the others."""
    T, H = x_TH.shape
    E = w_gate_up_E2IH.shape[0]
    slot_E = torch.full((E,), -1, dtype=torch.long)
    if trainable_ids_S is not None:
        slot_E[trainable_ids_S.cpu()] = torch.arange(trainable_ids_S.numel())
    y_TH = torch.zeros(T, H, dtype=torch.float32, device=x_TH.device)
    hit_E = torch.bincount(topk_idx_TK.flatten().cpu(), minlength=E)
    for e in torch.nonzero(hit_E).flatten().tolist():
        tok, kpos = torch.where(topk_idx_TK == e)
        s = int(slot_E[e])
        w_gu, w_d = (w_gate_up_S2IH[s], w_down_SHI[s]) if s >= 0 else (w_gate_up_E2IH[e], w_down_EHI[e])
        gate, up = F.linear(x_TH[tok], w_gu).chunk(2, dim=-1)
        out = F.linear(F.silu(gate) * up, w_d)
        y_TH = y_TH.index_add(0, tok, (out * topk_w_TK[tok, kpos, None]).float())
    return y_TH.to(x_TH.dtype)


def int8_blockwise_quantize(x: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Blockwise absmax int8 over the flattened tensor (zero-padded to whole blocks).

    Returns q [N, B] int8 and scale [N] fp32 with x ≈ q * scale[:, None]; scale = absmax / 127.
    """
    flat = x.detach().float().flatten()
    n_blocks = max(1, math.ceil(flat.numel() / block))
    padded = F.pad(flat, (0, n_blocks * block - flat.numel())).view(n_blocks, block)
    scale_N = padded.abs().amax(dim=1) / 127.0
    safe = torch.where(scale_N > 0, scale_N, torch.ones_like(scale_N))
    q_NB = torch.round(padded / safe[:, None]).clamp_(-127, 127).to(torch.int8)
    return q_NB, scale_N


def int8_blockwise_dequantize(q_NB: torch.Tensor, scale_N: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    numel = math.prod(shape)
    return (q_NB.float() * scale_N.float()[:, None]).flatten()[:numel].view(shape)


def topk_blockwise(x: torch.Tensor, block: int, keep: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per block of the flattened tensor, the `keep` entries of largest magnitude.

    Returns idx [N, keep] int16 (position inside the block) and the kept values [N, keep] fp32.
    """
    assert 1 <= keep <= block <= 32768
    flat = x.detach().float().flatten()
    n_blocks = max(1, math.ceil(flat.numel() / block))
    padded = F.pad(flat, (0, n_blocks * block - flat.numel())).view(n_blocks, block)
    idx_NK = padded.abs().topk(keep, dim=1, sorted=False).indices.sort(dim=1).values
    return idx_NK.to(torch.int16), padded.gather(1, idx_NK)


def topk_blockwise_scatter(idx_NK: torch.Tensor, val_NK: torch.Tensor, block: int, shape: tuple[int, ...]) -> torch.Tensor:
    numel = math.prod(shape)
    dense = torch.zeros(idx_NK.shape[0], block, dtype=torch.float32)
    dense.scatter_(1, idx_NK.long(), val_NK.float())
    return dense.flatten()[:numel].view(shape)
