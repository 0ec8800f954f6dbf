"""The reference's fast CPU path (torch grouped GEMM) against its per-expert loop: output and gradients.

Legend: T tokens, K top-k, E experts, S trainable experts, H hidden, I intermediate.
"""
import pytest
import torch

from expertmesh.kernels import reference

H, I = 32, 24  # row strides that are multiples of 16 bytes in every dtype, as grouped_mm needs
if not reference._grouped_mm_ok(torch.empty(0), torch.empty(1, H, I)):
    pytest.skip("this torch has no usable CPU grouped GEMM; the reference is the loop", allow_module_level=True)

TOL = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2}


@pytest.mark.parametrize("dtype", list(TOL), ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("T,K,E,ids,skip", [
    (20, 2, 6, [4, 1], None),          # ordinary
    (20, 2, 6, [5, 0], 5),             # trainable expert 5 gets no token
    (1, 2, 4, [3], None),              # one token
    (15, 1, 5, None, None),            # k = 1, nothing trainable
    (12, 3, 4, [2, 0, 3, 1], None),    # all trainable
], ids=["basic", "zero_token", "t1", "k1_frozen", "all_trainable"])
def test_grouped_matches_loop(T, K, E, ids, skip, dtype):
    g = torch.Generator().manual_seed(T + E)
    logits = torch.randn(T, E, generator=g)
    if skip is not None:
        logits[:, skip] = -1e9
    w_TK, idx_TK = torch.softmax(logits, -1).topk(K, dim=-1)
    x_TH = torch.randn(T, H, generator=g).to(dtype)
    wgu = (torch.randn(E, 2 * I, H, generator=g) / H ** 0.5).to(dtype)
    wd = (torch.randn(E, H, I, generator=g) / I ** 0.5).to(dtype)
    S = len(ids or [])
    cgu = (torch.randn(S, 2 * I, H, generator=g) / H ** 0.5).to(dtype)
    cd = (torch.randn(S, H, I, generator=g) / I ** 0.5).to(dtype)
    dy = torch.randn(T, H, generator=g).to(dtype)
    results = []
    for fn in (reference._expert_ffn_grouped, reference.expert_ffn_loop):
        leaves = [t.clone().requires_grad_() for t in (x_TH, w_TK.to(dtype), cgu, cd)]
        xg, wg, cg, cdg = leaves
        y = fn(xg, idx_TK, wg, wgu, wd, None if ids is None else torch.tensor(ids),
               None if ids is None else cg, None if ids is None else cdg)
        y.backward(dy)
        results.append([y.detach()] + [torch.zeros_like(t) if t.grad is None else t.grad for t in leaves])
    for what, got, want in zip(["y", "dx", "dtopk_w", "dw_gate_up", "dw_down"], *results):
        if not want.numel():
            continue
        err = (got.double() - want.double()).abs().max().item()
        assert err <= TOL[dtype] * max(1.0, want.double().abs().max().item()), f"{what}: {err:.3g}"
    if skip is not None:
        assert not results[0][3][0].any() and not results[0][4][0].any()  # slot of the idle expert


def test_unaligned_sizes_fall_back_to_the_loop():
    x_TH = torch.randn(3, 24, dtype=torch.float16)
    assert not reference._grouped_mm_ok(x_TH, torch.empty(2, 24, 20, dtype=torch.float16))  # 40-byte rows
    assert reference._grouped_mm_ok(x_TH.float(), torch.empty(2, 24, 20))
