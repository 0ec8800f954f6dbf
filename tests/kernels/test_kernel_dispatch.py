"""Dispatcher choice and argument checks, and the CPU path the selective trainer relies on.

Legend: T tokens, K top-k, E experts, S trainable experts, H hidden, I intermediate.
"""
import pytest
import torch
import torch.nn.functional as F

from expertmesh import kernels
from expertmesh.kernels.dispatch import choose_backend

T, K, E, H, I = 9, 2, 5, 16, 12


def inputs(dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x_TH = torch.randn(T, H, generator=g, dtype=dtype)
    w_TK, idx_TK = torch.softmax(torch.randn(T, E, generator=g), -1).topk(K, dim=-1)
    wgu = torch.randn(E, 2 * I, H, generator=g, dtype=dtype) / H ** 0.5
    wd = torch.randn(E, H, I, generator=g, dtype=dtype) / I ** 0.5
    return x_TH, idx_TK, w_TK.to(dtype), wgu, wd


def dense_oracle(x_TH, idx_TK, w_TK, wgu_E2IH, wd_EHI):
    """Every expert on every token, masked by the routing: independent of any grouping logic."""
    gate, up = torch.einsum("th,eih->tei", x_TH, wgu_E2IH).chunk(2, dim=-1)
    out_TEH = torch.einsum("tei,ehi->teh", F.silu(gate) * up, wd_EHI)
    route_TE = torch.zeros(T, E, dtype=x_TH.dtype).scatter_add(1, idx_TK, w_TK)
    return (route_TE[..., None] * out_TEH).sum(1)


def test_auto_picks_reference_on_cpu_and_env_overrides(monkeypatch, triton_device):
    monkeypatch.delenv("EXPERTMESH_KERNELS", raising=False)
    assert choose_backend(torch.device("cpu")) == "reference"
    monkeypatch.setenv("EXPERTMESH_KERNELS", "reference")
    assert choose_backend(torch.device("cpu"), None) == "reference"
    assert choose_backend(triton_device, "triton") == "triton"  # the argument beats the environment
    monkeypatch.setenv("EXPERTMESH_KERNELS", "cuda-please")
    with pytest.raises(ValueError, match="unknown kernels backend"):
        choose_backend(torch.device("cpu"))


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_selective_training_grads_reach_only_compact_and_x(backend, triton_device):
    """The selective trainer's call: frozen base, compact trainable copies of experts [3, 0]."""
    dev = "cpu" if backend == "reference" else triton_device
    x_TH, idx_TK, w_TK, wgu, wd = (t.to(dev) for t in inputs())
    ids = torch.tensor([3, 0], device=dev)
    g = torch.Generator().manual_seed(1)
    cgu = (wgu[ids] + 0.1 * torch.randn(2, 2 * I, H, generator=g).to(dev)).requires_grad_()
    cd = (wd[ids] + 0.1 * torch.randn(2, H, I, generator=g).to(dev)).requires_grad_()
    x_TH.requires_grad_()
    y = kernels.expert_ffn(x_TH, idx_TK, w_TK, wgu, wd, ids, cgu, cd, backend=backend)
    (y * torch.arange(H, device=dev)).sum().backward()
    assert wgu.grad is None and wd.grad is None and w_TK.grad is None

    # Oracle: the same experts written into full weights (differentiably), evaluated densely.
    x2 = x_TH.detach().cpu().double().requires_grad_()
    cgu2, cd2 = cgu.detach().cpu().double().requires_grad_(), cd.detach().cpu().double().requires_grad_()
    full_gu = wgu.cpu().double().index_copy(0, ids.cpu(), cgu2)
    full_d = wd.cpu().double().index_copy(0, ids.cpu(), cd2)
    y2 = dense_oracle(x2, idx_TK.cpu(), w_TK.cpu().double(), full_gu, full_d)
    (y2 * torch.arange(H)).sum().backward()
    for got, want in [(y, y2), (x_TH.grad, x2.grad), (cgu.grad, cgu2.grad), (cd.grad, cd2.grad)]:
        torch.testing.assert_close(got.detach().cpu().double(), want.detach(), rtol=1e-4, atol=1e-4)


def test_cpu_tensors_default_to_reference_even_when_interpreting(monkeypatch):
    monkeypatch.delenv("EXPERTMESH_KERNELS", raising=False)
    x_TH, idx_TK, w_TK, wgu, wd = inputs(torch.float64)
    y = kernels.expert_ffn(x_TH, idx_TK, w_TK, wgu, wd)  # fp64: only the reference path supports it
    torch.testing.assert_close(y, dense_oracle(x_TH, idx_TK, w_TK, wgu, wd))


def test_argument_errors_say_what_to_do():
    x_TH, idx_TK, w_TK, wgu, wd = inputs()
    ids = torch.tensor([1])
    with pytest.raises(ValueError, match="share one dtype"):
        kernels.expert_ffn(x_TH.half(), idx_TK, w_TK, wgu, wd)
    with pytest.raises(ValueError, match="go together"):
        kernels.expert_ffn(x_TH, idx_TK, w_TK, wgu, wd, ids)
    with pytest.raises(ValueError, match="must be frozen"):
        kernels.expert_ffn(x_TH, idx_TK, w_TK, wgu.requires_grad_(), wd, ids, wgu[ids].detach(), wd[ids])
    with pytest.raises(ValueError, match=r"\[E, 2I, H\]"):
        kernels.expert_ffn(x_TH, idx_TK, w_TK, wgu.detach()[:, :, :-1], wd)
