"""Triton forward kernels of the grouped SwiGLU experts.

Legend: T tokens, K top-k, P = T*K sorted rows, H hidden, I expert intermediate size, E experts,
S trainable slots, G groups (trainable slots first, then frozen experts; see kernels/routing.py),
BM/BN/BK tile sizes. Weight tensors are contiguous: gate_up [., 2I, H] as [gate; up], down [., H, I].

Each program takes one tile of BM sorted rows, all belonging to one group, and picks that group's
weights once: from the compact trainable tensor when the group is a trainable slot, else from the
frozen base tensor. Tokens are gathered inside the K loop of the first GEMM (no permuted copy of
x), and the second GEMM scatters its rows back to token order (row t*K+k), scaled by the routing
weight, so the K contributions of a token are summed deterministically afterwards.
"""
import triton
import triton.language as tl


@triton.jit
def ffn_up_fwd(
    x_ptr, sx_t, sx_h,                      # x [T, H], any strides
    wb_ptr, wc_ptr,                         # gate_up base [E, 2I, H], compact [S, 2I, H]
    perm_ptr, tile_group_ptr, tile_row_ptr, offsets_ptr, expert_ptr,
    gu_ptr, h_ptr,                          # out: pre-activations [P, 2I] (if SAVE_GU), h [P, I]
    K, H, I, S, G_ACTIVE,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
    SAVE_GU: tl.constexpr, PREC: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    g = tl.load(tile_group_ptr + pid_m)
    if g >= G_ACTIVE:
        return
    row0 = tl.load(tile_row_ptr + pid_m)
    row_end = tl.load(offsets_ptr + g + 1)
    if g < S:
        w = wc_ptr + g.to(tl.int64) * (2 * I * H)
    else:
        w = wb_ptr + tl.load(expert_ptr + g).to(tl.int64) * (2 * I * H)

    rows = row0 + tl.arange(0, BM)
    rmask = rows < row_end
    tok = (tl.load(perm_ptr + rows, mask=rmask, other=0) // K).to(tl.int64)
    cols = pid_n * BN + tl.arange(0, BN)
    cmask = cols < I
    ks = tl.arange(0, BK)
    x_ptrs = x_ptr + tok[:, None] * sx_t + ks[None, :] * sx_h
    wg_ptrs = w + cols[None, :].to(tl.int64) * H + ks[:, None]      # W_gate^T tile [BK, BN]
    wu_ptrs = wg_ptrs + I * H                                         # W_up^T tile
    acc_g = tl.zeros((BM, BN), dtype=tl.float32)
    acc_u = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, H, BK):
        kmask = (k0 + ks) < H
        a = tl.load(x_ptrs, mask=rmask[:, None] & kmask[None, :], other=0.0)
        bg = tl.load(wg_ptrs, mask=kmask[:, None] & cmask[None, :], other=0.0)
        bu = tl.load(wu_ptrs, mask=kmask[:, None] & cmask[None, :], other=0.0)
        acc_g = tl.dot(a, bg, acc_g, input_precision=PREC)
        acc_u = tl.dot(a, bu, acc_u, input_precision=PREC)
        x_ptrs += BK * sx_h
        wg_ptrs += BK
        wu_ptrs += BK

    r64 = rows.to(tl.int64)
    omask = rmask[:, None] & cmask[None, :]
    if SAVE_GU:
        gu_ptrs = gu_ptr + r64[:, None] * (2 * I) + cols[None, :]
        tl.store(gu_ptrs, acc_g.to(gu_ptr.dtype.element_ty), mask=omask)
        tl.store(gu_ptrs + I, acc_u.to(gu_ptr.dtype.element_ty), mask=omask)
    h = acc_g * tl.sigmoid(acc_g) * acc_u
    tl.store(h_ptr + r64[:, None] * I + cols[None, :], h.to(h_ptr.dtype.element_ty), mask=omask)


@triton.jit
def ffn_down_fwd(
    h_ptr,                                  # [P, I] sorted rows
    wb_ptr, wc_ptr,                         # down base [E, H, I], compact [S, H, I]
    rw_ptr,                                 # routing weights, contiguous [T*K]
    perm_ptr, tile_group_ptr, tile_row_ptr, offsets_ptr, expert_ptr,
    out_ptr,                                # [P, H] in token order (row t*K+k)
    H, I, S, G_ACTIVE,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, PREC: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    g = tl.load(tile_group_ptr + pid_m)
    if g >= G_ACTIVE:
        return
    row0 = tl.load(tile_row_ptr + pid_m)
    row_end = tl.load(offsets_ptr + g + 1)
    if g < S:
        w = wc_ptr + g.to(tl.int64) * (H * I)
    else:
        w = wb_ptr + tl.load(expert_ptr + g).to(tl.int64) * (H * I)

    rows = row0 + tl.arange(0, BM)
    rmask = rows < row_end
    r64 = rows.to(tl.int64)
    cols = pid_n * BN + tl.arange(0, BN)
    cmask = cols < H
    ks = tl.arange(0, BK)
    a_ptrs = h_ptr + r64[:, None] * I + ks[None, :]
    b_ptrs = w + cols[None, :].to(tl.int64) * I + ks[:, None]        # W_down^T tile [BK, BN]
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, I, BK):
        kmask = (k0 + ks) < I
        a = tl.load(a_ptrs, mask=rmask[:, None] & kmask[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=kmask[:, None] & cmask[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PREC)
        a_ptrs += BK
        b_ptrs += BK

    perm = tl.load(perm_ptr + rows, mask=rmask, other=0).to(tl.int64)
    rw = tl.load(rw_ptr + perm, mask=rmask, other=0.0).to(tl.float32)
    acc = acc * rw[:, None]
    out_ptrs = out_ptr + perm[:, None] * H + cols[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=rmask[:, None] & cmask[None, :])
