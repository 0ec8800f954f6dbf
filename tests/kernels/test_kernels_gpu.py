"""GPU-only checks: bf16 (which Triton's CPU interpreter gets wrong), realistic sizes, memory.

Legend: T tokens, K top-k, E experts, S trainable experts, H hidden, I intermediate.
The fp32/fp16 parity tests in the other files also run compiled when a GPU is present.
"""
import pytest
import torch

from expertmesh import kernels

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def routed_inputs(T, K, E, H, I, S, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, H, generator=g)
    w, idx = torch.softmax(torch.randn(T, E, generator=g), -1).topk(K, dim=-1)
    wgu = torch.randn(E, 2 * I, H, generator=g) / H ** 0.5
    wd = torch.randn(E, H, I, generator=g) / I ** 0.5
    ids = torch.randperm(E, generator=g)[:S]
    cgu = wgu[ids] + 0.05 * torch.randn(S, 2 * I, H, generator=g) / H ** 0.5
    cd = wd[ids] + 0.05 * torch.randn(S, H, I, generator=g) / I ** 0.5
    dy = torch.randn(T, H, generator=g)
    dev = "cuda"
    return [t.to(dev, dtype) if t.is_floating_point() else t.to(dev) for t in (x, idx, w, wgu, wd, ids, cgu, cd, dy)]


def fwd_bwd(backend, x, idx, w, wgu, wd, ids, cgu, cd, dy):
    x, w, cgu, cd = (t.detach().clone().requires_grad_() for t in (x, w, cgu, cd))
    y = kernels.expert_ffn(x, idx, w, wgu, wd, ids, cgu, cd, backend=backend)
    y.backward(dy)
    return [t.detach().double() for t in (y, x.grad, w.grad, cgu.grad, cd.grad)]


@pytest.mark.parametrize("H,I", [(512, 256), (200, 136)], ids=["aligned", "odd"])
def test_bf16_parity_at_realistic_routing(H, I):
    args = routed_inputs(T=1024, K=8, E=32, H=H, I=I, S=4, dtype=torch.bfloat16)
    got = fwd_bwd("triton", *args)
    want = fwd_bwd("reference", *[t.double() if t.is_floating_point() else t for t in args])
    for what, g, r in zip(["y", "dx", "dtopk_w", "dw_gate_up", "dw_down"], got, want):
        err = (g - r).abs().max().item()
        assert err <= 2e-2 * r.abs().max().item(), f"{what}: max error {err:.3g}"


def test_selective_backward_allocates_no_frozen_weight_grads():
    T, K, E, H, I = 2048, 8, 64, 1024, 512
    peaks = {}
    for S in (4, E):
        x, idx, w, wgu, wd, ids, cgu, cd, dy = routed_inputs(T, K, E, H, I, S, torch.bfloat16)
        cgu.requires_grad_()
        cd.requires_grad_()
        y = kernels.expert_ffn(x.requires_grad_(), idx, w, wgu, wd, ids, cgu, cd)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        y.backward(dy)
        torch.cuda.synchronize()
        peaks[S] = torch.cuda.max_memory_allocated() - before
    frozen_dw_bytes = (E - 4) * 3 * I * H * 2
    assert peaks[E] - peaks[4] >= 0.9 * frozen_dw_bytes, peaks
