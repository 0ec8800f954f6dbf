"""Autograd wrapper of the Triton grouped SwiGLU experts, selective in its backward.

Legend: T tokens, K top-k, P = T*K routed rows, H hidden, I expert intermediate size, E experts,
S trainable slots (compact tensors), J tiles.

Forward saves only what the backward needs: the [gate; up] pre-activations of every row (h is
recomputed from them) and references to the inputs. Backward computes
  dgu   for every row when dX or the routing weights need a gradient, else for trainable rows only,
  dX    only when x requires grad,
  d rw  only when the routing weights require grad (a frozen router costs nothing),
  dW    only for the compact trainable tensors, never for the frozen base.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from . import ffn_bwd_kernels as bwd
from . import ffn_fwd_kernels as fwd
from .dispatch import interpreting
from .routing import Routing, build_routing


@dataclass(frozen=True)
class TileConfig:
    block_m: int
    block_n: int
    block_n_dual: int   # for the kernels that hold two [BM, BN] fp32 tiles (gate and up)
    block_k: int
    num_warps: int
    num_stages: int


# Untuned starting point for Hopper-class cards (no GPU was available to run on). Compiled for sm_90
# offline (tests/kernels/sm90_compile.py): every GEMM loop pipelined onto wgmma, no register spills;
# with block_n_dual = 128 the gate/up kernels spilled. The interpreter gets the smallest tiles
# tl.dot accepts so the CPU tests stay fast.
GPU_TILES = TileConfig(block_m=128, block_n=128, block_n_dual=64, block_k=64, num_warps=8, num_stages=3)
INTERPRET_TILES = TileConfig(block_m=16, block_n=16, block_n_dual=16, block_k=16, num_warps=1, num_stages=1)


def _cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


def tiles() -> TileConfig:
    return INTERPRET_TILES if interpreting() else GPU_TILES


def _launch_opts(cfg: TileConfig) -> dict:
    return {} if interpreting() else {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages}


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs get exact fp32 products (tf32 would miss the reference by ~1e-3); halves ignore it."""
    return "ieee" if dtype == torch.float32 else "tf32"


class GroupedExpertFFN(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_TH, topk_w_TK, w_gu_S2IH, w_d_SHI, w_gu_E2IH, w_d_EHI, rt: Routing, cfg: TileConfig, grad_mode: bool):
        T, H = x_TH.shape
        I = w_d_EHI.shape[2]
        P, S, E = rt.num_rows, rt.num_trainable, rt.num_experts
        dev, dt = x_TH.device, x_TH.dtype
        wgu_b, wd_b = w_gu_E2IH.contiguous(), w_d_EHI.contiguous()
        # A null compact pointer would not compile; with S = 0 no tile ever reads it.
        wgu_c = wgu_b if w_gu_S2IH is None else w_gu_S2IH.contiguous()
        wd_c = wd_b if w_d_SHI is None else w_d_SHI.contiguous()
        rw_P = topk_w_TK.contiguous().view(-1)
        # needs_input_grad stays True under torch.no_grad(); evaluation must not save activations.
        need_bwd = grad_mode and any(ctx.needs_input_grad[:4])
        opts = _launch_opts(cfg)
        prec = dot_precision(dt)
        meta = (rt.perm_P, rt.tile_group_J, rt.tile_row_J, rt.offsets_G1, rt.expert_G)

        gu_P2I = torch.empty(P, 2 * I, dtype=dt, device=dev) if need_bwd else None
        h_PI = torch.empty(P, I, dtype=dt, device=dev)
        fwd.ffn_up_fwd[(rt.max_tiles, _cdiv(I, cfg.block_n_dual))](
            x_TH, x_TH.stride(0), x_TH.stride(1), wgu_b, wgu_c, *meta,
            h_PI if gu_P2I is None else gu_P2I, h_PI, rt.top_k, H, I, S, E,
            BM=cfg.block_m, BN=cfg.block_n_dual, BK=cfg.block_k, SAVE_GU=need_bwd, PREC=prec, **opts)
        out_PH = torch.empty(P, H, dtype=dt, device=dev)
        fwd.ffn_down_fwd[(rt.max_tiles, _cdiv(H, cfg.block_n))](
            h_PI, wd_b, wd_c, rw_P, *meta, out_PH, H, I, S, E,
            BM=cfg.block_m, BN=cfg.block_n, BK=cfg.block_k, PREC=prec, **opts)
        del h_PI
        if need_bwd:
            ctx.save_for_backward(x_TH, rw_P, gu_P2I, wgu_b, wd_b, wgu_c, wd_c)
            ctx.rt, ctx.cfg, ctx.rw_shape, ctx.rw_dtype = rt, cfg, topk_w_TK.shape, topk_w_TK.dtype
        # Summing the K rows of a token here (fp32 accumulation) instead of atomics in the
        # kernel keeps the forward bit-for-bit deterministic.
        return out_PH.view(T, rt.top_k, H).sum(dim=1)

    @staticmethod
    def backward(ctx, dy_TH):
        x_TH, rw_P, gu_P2I, wgu_b, wd_b, wgu_c, wd_c = ctx.saved_tensors
        rt, cfg = ctx.rt, ctx.cfg
        need_dx, need_drw, need_dwgu, need_dwd = ctx.needs_input_grad[:4]
        T, H = x_TH.shape
        I = wd_b.shape[2]
        P, S, E, K = rt.num_rows, rt.num_trainable, rt.num_experts, rt.top_k
        dev, dt = x_TH.device, x_TH.dtype
        dy_TH = dy_TH.to(dt)
        opts = _launch_opts(cfg)
        prec = dot_precision(dt)
        meta = (rt.perm_P, rt.tile_group_J, rt.tile_row_J, rt.offsets_G1, rt.expert_G)
        tiles = dict(BM=cfg.block_m, BN=cfg.block_n, BK=cfg.block_k, PREC=prec, **opts)

        # Groups are ordered trainable-first, so "trainable rows only" is the group prefix [0, S).
        g_active = E if (need_dx or need_drw) else S
        n_tiles_i = _cdiv(I, cfg.block_n_dual)
        dgu_P2I = torch.empty(P, 2 * I, dtype=dt, device=dev)
        drw_PN = torch.empty(P, n_tiles_i, dtype=torch.float32, device=dev) if need_drw else None
        bwd.ffn_dgu_bwd[(rt.max_tiles, n_tiles_i)](
            dy_TH, dy_TH.stride(0), dy_TH.stride(1), gu_P2I, wd_b, wd_c, rw_P, *meta,
            dgu_P2I, dgu_P2I if drw_PN is None else drw_PN, K, H, I, S, g_active, n_tiles_i,
            NEED_DRW=bool(need_drw), **{**tiles, "BN": cfg.block_n_dual})

        dx_TH = drw_TK = dwgu_S2IH = dwd_SHI = None
        if need_dx:
            dx_PH = torch.empty(P, H, dtype=dt, device=dev)
            bwd.ffn_dx_bwd[(rt.max_tiles, _cdiv(H, cfg.block_n))](
                dgu_P2I, wgu_b, wgu_c, *meta, dx_PH, H, I, S, E, **tiles)
            dx_TH = dx_PH.view(T, K, H).sum(dim=1)
        if need_drw:
            drw_TK = drw_PN.sum(dim=1).view(ctx.rw_shape).to(ctx.rw_dtype)
        if need_dwgu:
            dwgu_S2IH = torch.empty(S, 2 * I, H, dtype=dt, device=dev)
            bwd.ffn_dw_gate_up_bwd[(S, _cdiv(2 * I, cfg.block_m), _cdiv(H, cfg.block_n))](
                dgu_P2I, x_TH, x_TH.stride(0), x_TH.stride(1), rt.perm_P, rt.offsets_G1, dwgu_S2IH, K, H, I, **tiles)
        if need_dwd:
            dwd_SHI = torch.empty(S, H, I, dtype=dt, device=dev)
            bwd.ffn_dw_down_bwd[(S, _cdiv(H, cfg.block_m), _cdiv(I, cfg.block_n))](
                dy_TH, dy_TH.stride(0), dy_TH.stride(1), gu_P2I, rw_P, rt.perm_P, rt.offsets_G1, dwd_SHI, K, H, I, **tiles)
        return dx_TH, drw_TK, dwgu_S2IH, dwd_SHI, None, None, None, None, None


def expert_ffn_triton(
    x_TH: torch.Tensor,
    topk_idx_TK: torch.Tensor,
    topk_w_TK: torch.Tensor,
    w_gate_up_E2IH: torch.Tensor,
    w_down_EHI: torch.Tensor,
    trainable_ids_S: torch.Tensor | None = None,
    w_gate_up_S2IH: torch.Tensor | None = None,
    w_down_SHI: torch.Tensor | None = None,
) -> torch.Tensor:
    """Same contract as kernels.reference.expert_ffn; the dispatcher validates arguments first."""
    cfg = tiles()
    rt = build_routing(topk_idx_TK, w_gate_up_E2IH.shape[0], trainable_ids_S, cfg.block_m)
    return GroupedExpertFFN.apply(x_TH, topk_w_TK, w_gate_up_S2IH, w_down_SHI, w_gate_up_E2IH, w_down_EHI, rt, cfg,
                                   torch.is_grad_enabled())
