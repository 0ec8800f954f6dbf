"""Triton backward kernels of the grouped SwiGLU experts.

Legend: T tokens, K top-k, P = T*K sorted rows, H hidden, I expert intermediate size, S trainable
slots, G groups (trainable slots first), BM/BN/BK tile sizes, rw routing weight of a row,
gu = [gate; up] pre-activations saved by the forward, h = silu(gate) * up, dA = dy @ W_down.

Only dgu and dX touch every row. The weight-gradient kernels run one program per (trainable slot,
tile of the weight) and loop over that slot's rows only, so frozen experts never get a gradient
buffer. The routing-weight gradient d rw = <dA, h> falls out of the dgu kernel's epilogue (dA is
needed there anyway), so the unweighted expert outputs never have to be stored.
"""
import triton
import triton.language as tl


@triton.jit
def ffn_dgu_bwd(
    dy_ptr, sdy_t, sdy_h,                   # dy [T, H], any strides
    gu_ptr,                                 # [P, 2I] saved pre-activations
    wb_ptr, wc_ptr,                         # down base [E, H, I], compact [S, H, I]
    rw_ptr,                                 # routing weights [T*K]
    perm_ptr, tile_group_ptr, tile_row_ptr, offsets_ptr, expert_ptr,
    dgu_ptr,                                # out [P, 2I]
    drw_ptr,                                # out [T*K, n_tiles_I] fp32 partial sums (if NEED_DRW)
    K, H, I, S, G_ACTIVE, N_TILES_I,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
    NEED_DRW: tl.constexpr, PREC: tl.constexpr,
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
    perm = tl.load(perm_ptr + rows, mask=rmask, other=0).to(tl.int64)
    tok = perm // K
    cols = pid_n * BN + tl.arange(0, BN)
    cmask = cols < I
    ks = tl.arange(0, BK)
    a_ptrs = dy_ptr + tok[:, None] * sdy_t + ks[None, :] * sdy_h
    b_ptrs = w + ks[:, None].to(tl.int64) * I + cols[None, :]          # W_down tile [BK(h), BN(i)]
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, H, BK):
        kmask = (k0 + ks) < H
        a = tl.load(a_ptrs, mask=rmask[:, None] & kmask[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=kmask[:, None] & cmask[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PREC)
        a_ptrs += BK * sdy_h
        b_ptrs += BK * I

    r64 = rows.to(tl.int64)
    omask = rmask[:, None] & cmask[None, :]
    gu_ptrs = gu_ptr + r64[:, None] * (2 * I) + cols[None, :]
    gate = tl.load(gu_ptrs, mask=omask, other=0.0).to(tl.float32)
    up = tl.load(gu_ptrs + I, mask=omask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(gate)
    silu = gate * sig
    if NEED_DRW:
        part = tl.sum(acc * silu * up, axis=1)
        tl.store(drw_ptr + perm * N_TILES_I + pid_n, part, mask=rmask)
    rw = tl.load(rw_ptr + perm, mask=rmask, other=0.0).to(tl.float32)
    dh = acc * rw[:, None]
    d_up = dh * silu
    d_gate = dh * up * sig * (1.0 + gate * (1.0 - sig))
    dgu_ptrs = dgu_ptr + r64[:, None] * (2 * I) + cols[None, :]
    tl.store(dgu_ptrs, d_gate.to(dgu_ptr.dtype.element_ty), mask=omask)
    tl.store(dgu_ptrs + I, d_up.to(dgu_ptr.dtype.element_ty), mask=omask)


@triton.jit
def ffn_dx_bwd(
    dgu_ptr,                                # [P, 2I] sorted rows
    wb_ptr, wc_ptr,                         # gate_up base [E, 2I, H], compact [S, 2I, H]
    perm_ptr, tile_group_ptr, tile_row_ptr, offsets_ptr, expert_ptr,
    dx_ptr,                                 # out [P, H] in token order (row t*K+k)
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
        w = wc_ptr + g.to(tl.int64) * (2 * I * H)
    else:
        w = wb_ptr + tl.load(expert_ptr + g).to(tl.int64) * (2 * I * H)

    rows = row0 + tl.arange(0, BM)
    rmask = rows < row_end
    r64 = rows.to(tl.int64)
    cols = pid_n * BN + tl.arange(0, BN)
    cmask = cols < H
    ks = tl.arange(0, BK)
    a_ptrs = dgu_ptr + r64[:, None] * (2 * I) + ks[None, :]
    b_ptrs = w + ks[:, None].to(tl.int64) * H + cols[None, :]          # W_gate_up tile [BK, BN]
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, 2 * I, BK):
        kmask = (k0 + ks) < 2 * I
        a = tl.load(a_ptrs, mask=rmask[:, None] & kmask[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=kmask[:, None] & cmask[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PREC)
        a_ptrs += BK
        b_ptrs += BK * H

    perm = tl.load(perm_ptr + rows, mask=rmask, other=0).to(tl.int64)
    tl.store(dx_ptr + perm[:, None] * H + cols[None, :], acc.to(dx_ptr.dtype.element_ty),
             mask=rmask[:, None] & cmask[None, :])


@triton.jit
def ffn_dw_gate_up_bwd(
    dgu_ptr,                                # [P, 2I] sorted rows
    x_ptr, sx_t, sx_h,                      # x [T, H]
    perm_ptr, offsets_ptr,
    dw_ptr,                                 # out [S, 2I, H]
    K, H, I,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, PREC: tl.constexpr,
):
    s = tl.program_id(0)
    ms = tl.program_id(1) * BM + tl.arange(0, BM)                     # rows of [2I]
    ns = tl.program_id(2) * BN + tl.arange(0, BN)                     # columns of [H]
    mmask = ms < 2 * I
    nmask = ns < H
    r0 = tl.load(offsets_ptr + s)
    r1 = tl.load(offsets_ptr + s + 1)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for r in range(r0, r1, BK):
        rr = r + tl.arange(0, BK)
        rmask = rr < r1
        tok = (tl.load(perm_ptr + rr, mask=rmask, other=0) // K).to(tl.int64)
        a = tl.load(dgu_ptr + rr[None, :].to(tl.int64) * (2 * I) + ms[:, None],
                    mask=mmask[:, None] & rmask[None, :], other=0.0)          # dgu^T [BM, BK]
        b = tl.load(x_ptr + tok[:, None] * sx_t + ns[None, :] * sx_h,
                    mask=rmask[:, None] & nmask[None, :], other=0.0)          # x rows [BK, BN]
        acc = tl.dot(a, b, acc, input_precision=PREC)
    out = dw_ptr + s.to(tl.int64) * (2 * I * H) + ms[:, None].to(tl.int64) * H + ns[None, :]
    tl.store(out, acc.to(dw_ptr.dtype.element_ty), mask=mmask[:, None] & nmask[None, :])


@triton.jit
def ffn_dw_down_bwd(
    dy_ptr, sdy_t, sdy_h,                   # dy [T, H]
    gu_ptr,                                 # [P, 2I] saved pre-activations
    rw_ptr,                                 # routing weights [T*K]
    perm_ptr, offsets_ptr,
    dw_ptr,                                 # out [S, H, I]
    K, H, I,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, PREC: tl.constexpr,
):
    s = tl.program_id(0)
    ms = tl.program_id(1) * BM + tl.arange(0, BM)                     # rows of [H]
    ns = tl.program_id(2) * BN + tl.arange(0, BN)                     # columns of [I]
    mmask = ms < H
    nmask = ns < I
    r0 = tl.load(offsets_ptr + s)
    r1 = tl.load(offsets_ptr + s + 1)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for r in range(r0, r1, BK):
        rr = r + tl.arange(0, BK)
        rmask = rr < r1
        perm = tl.load(perm_ptr + rr, mask=rmask, other=0).to(tl.int64)
        tok = perm // K
        rw = tl.load(rw_ptr + perm, mask=rmask, other=0.0).to(tl.float32)
        a = tl.load(dy_ptr + tok[None, :] * sdy_t + ms[:, None] * sdy_h,
                    mask=mmask[:, None] & rmask[None, :], other=0.0)          # dy^T [BM, BK]
        a = (a.to(tl.float32) * rw[None, :]).to(dy_ptr.dtype.element_ty)
        gu_ptrs = gu_ptr + rr[:, None].to(tl.int64) * (2 * I) + ns[None, :]
        gmask = rmask[:, None] & nmask[None, :]
        gate = tl.load(gu_ptrs, mask=gmask, other=0.0).to(tl.float32)
        up = tl.load(gu_ptrs + I, mask=gmask, other=0.0).to(tl.float32)
        h = (gate * tl.sigmoid(gate) * up).to(gu_ptr.dtype.element_ty)       # h rows [BK, BN]
        acc = tl.dot(a, h, acc, input_precision=PREC)
    out = dw_ptr + s.to(tl.int64) * (H * I) + ms[:, None].to(tl.int64) * I + ns[None, :]
    tl.store(out, acc.to(dw_ptr.dtype.element_ty), mask=mmask[:, None] & nmask[None, :])
