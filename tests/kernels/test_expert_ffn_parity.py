"""Triton grouped experts vs the reference: forward, dX, d topk_w, dW of trainable experts, no frozen dW.

Legend: T tokens, K top-k, E experts, S trainable experts, H hidden, I intermediate.
The Triton side runs compiled on CUDA when present, else in the CPU interpreter (see conftest).
The oracle is the reference in float64 on CPU from the same (already rounded) inputs.
"""
from dataclasses import dataclass

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from expertmesh import kernels
from expertmesh.kernels import reference

TOL = {torch.float32: 2e-5, torch.float16: 1e-2}


@dataclass
class Case:
    T: int
    K: int
    E: int
    H: int
    I: int
    ids: list[int] | None
    route: str = "random"  # random | skip_last (last expert gets no token) | one (all on expert 1)


CASES = {
    "basic": Case(16, 2, 4, 40, 24, [2, 0]),                      # H, I not multiples of the block
    "multi_tile": Case(48, 2, 3, 32, 16, [1]),                    # several row tiles per expert
    "zero_token_expert": Case(12, 2, 4, 24, 20, [3, 1], "skip_last"),
    "all_on_one_expert": Case(10, 1, 4, 24, 20, [1, 2], "one"),   # trainable expert 2 gets nothing
    "t1": Case(1, 2, 4, 24, 20, [0]),
    "k1": Case(14, 1, 5, 24, 20, [4, 0]),
    "no_trainable": Case(12, 2, 4, 24, 20, None),
    "all_trainable": Case(12, 3, 4, 24, 20, [3, 0, 2, 1]),
}


def make_inputs(c: Case, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x_TH = torch.randn(c.T, c.H, generator=g).to(dtype)
    logits = torch.randn(c.T, c.E, generator=g)
    if c.route == "skip_last":
        logits[:, -1] = -1e9
    if c.route == "one":
        logits[:, 1] = 1e9
    w_TK, idx_TK = torch.softmax(logits, -1).topk(c.K, dim=-1)
    w_TK = w_TK.to(dtype)
    wgu_E2IH = (torch.randn(c.E, 2 * c.I, c.H, generator=g) / c.H ** 0.5).to(dtype)
    wd_EHI = (torch.randn(c.E, c.H, c.I, generator=g) / c.I ** 0.5).to(dtype)
    dy_TH = torch.randn(c.T, c.H, generator=g).to(dtype)
    # Trained copies differ from the base, so a tile reading the wrong tensor cannot pass.
    S = len(c.ids or [])
    cgu_S2IH = (torch.randn(S, 2 * c.I, c.H, generator=g) / c.H ** 0.5).to(dtype)
    cd_SHI = (torch.randn(S, c.H, c.I, generator=g) / c.I ** 0.5).to(dtype)
    return x_TH, idx_TK, w_TK, wgu_E2IH, wd_EHI, dy_TH, cgu_S2IH, cd_SHI


def run(c: Case, inputs, device, backend, *, x_grad=True, w_grad=True, dy_noncontig=False, dtype=None):
    """One forward+backward; returns y and every gradient (None where none was asked for)."""
    x_TH, idx_TK, w_TK, wgu_E2IH, wd_EHI, dy_TH, cgu, cd = (t.to(device=device, dtype=dtype if t.is_floating_point() and dtype else t.dtype) for t in inputs)
    x_TH.requires_grad_(x_grad)
    w_TK.requires_grad_(w_grad)
    ids_S = None if c.ids is None else torch.tensor(c.ids, device=device)
    if ids_S is None:
        cgu = cd = None
    else:
        cgu.requires_grad_()
        cd.requires_grad_()
    y_TH = kernels.expert_ffn(x_TH, idx_TK, w_TK, wgu_E2IH, wd_EHI, ids_S, cgu, cd, backend=backend)
    if dy_noncontig:
        dy_TH = dy_TH.t().contiguous().t()  # same values, column-major strides
        assert not dy_TH.is_contiguous()
    if x_grad or w_grad or ids_S is not None:
        y_TH.backward(dy_TH)
    assert wgu_E2IH.grad is None and wd_EHI.grad is None
    grads = [x_TH.grad, w_TK.grad, None if cgu is None else cgu.grad, None if cd is None else cd.grad]
    return [t if t is None else t.detach().cpu().double() for t in [y_TH, *grads]]


def assert_close(got, want, tol, what):
    if want is None:
        assert got is None or not got.abs().any(), f"{what}: expected no gradient"
        return
    assert got is not None, f"{what}: gradient missing"
    err = (got - want).abs().max().item()
    assert err <= tol * max(1.0, want.abs().max().item()), f"{what}: max error {err:.3g}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("name", list(CASES))
def test_parity(name, dtype, triton_device):
    c = CASES[name]
    inputs = make_inputs(c, dtype)
    want = run(c, inputs, "cpu", "reference", dtype=torch.float64)
    got = run(c, inputs, triton_device, "triton", dy_noncontig=name == "basic")
    for what, g, w in zip(["y", "dx", "dtopk_w", "dw_gate_up", "dw_down"], got, want):
        assert_close(g, w, TOL[dtype], f"{name}/{what}")
    if c.route == "one" and c.ids is not None:
        assert not got[3][1].any() and not got[4][1].any()  # trainable expert 2 saw no token


@pytest.mark.parametrize("x_grad,w_grad", [(False, True), (True, False), (False, False)],
                         ids=["x_frozen", "router_frozen", "only_weights"])
def test_partial_requires_grad(x_grad, w_grad, triton_device):
    """Skipped dX / router gradients stay absent and the remaining gradients are unchanged."""
    c = CASES["basic"]
    inputs = make_inputs(c, torch.float32, seed=1)
    want = run(c, inputs, "cpu", "reference", x_grad=x_grad, w_grad=w_grad, dtype=torch.float64)
    got = run(c, inputs, triton_device, "triton", x_grad=x_grad, w_grad=w_grad)
    for what, g, w in zip(["y", "dx", "dtopk_w", "dw_gate_up", "dw_down"], got, want):
        assert_close(g, w, TOL[torch.float32], what)


def test_full_finetune_without_compact(triton_device):
    """Base weights that require grad and no selection: every expert is trained, grads reach the base."""
    c = CASES["k1"]
    x_TH, idx_TK, w_TK, wgu, wd, dy, _, _ = make_inputs(c, torch.float32, seed=2)
    grads = []
    for dev, backend in (("cpu", "reference"), (triton_device, "triton")):
        gu, d = wgu.to(dev).requires_grad_(), wd.to(dev).requires_grad_()
        y = kernels.expert_ffn(x_TH.to(dev), idx_TK.to(dev), w_TK.to(dev), gu, d, backend=backend)
        y.backward(dy.to(dev))
        grads.append((y.detach().cpu(), gu.grad.cpu(), d.grad.cpu()))
    for g, w in zip(grads[1], grads[0]):
        assert_close(g.double(), w.double(), 1e-4, "full finetune")


class _Allocations(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.__name__.startswith(("empty", "zeros", "new_empty", "new_zeros", "full")):
            self.shapes.append(tuple(out.shape))
        return out


def test_backward_allocates_no_frozen_weight_grads(triton_device):
    """The selective backward never creates an [E, ...] weight-gradient buffer, only [S, ...] ones."""
    c = Case(20, 2, 6, 32, 16, [4])
    x_TH, idx_TK, w_TK, wgu, wd, dy, cgu, cd = (t.to(triton_device) for t in make_inputs(c, torch.float32, seed=3))
    x_TH.requires_grad_()
    ids = torch.tensor(c.ids, device=triton_device)
    cgu.requires_grad_()
    cd.requires_grad_()
    y = kernels.expert_ffn(x_TH, idx_TK, w_TK, wgu, wd, ids, cgu, cd, backend="triton")
    with _Allocations() as allocs:
        y.backward(dy)
    weightlike = [s for s in allocs.shapes if len(s) == 3]
    assert weightlike, "allocation hook saw nothing; the check would be vacuous"
    assert all(s[0] == len(c.ids) for s in weightlike), weightlike


def test_no_grad_forward_saves_no_activations(triton_device):
    """Evaluation under torch.no_grad() must not keep the [T*K, 2I] pre-activations for a backward."""
    c = Case(20, 2, 6, 40, 16, [4])  # H != 2I, so no other buffer has the saved shape
    x_TH, idx_TK, w_TK, wgu, wd, _, cgu, cd = (t.to(triton_device) for t in make_inputs(c, torch.float32, seed=4))
    ids = torch.tensor(c.ids, device=triton_device)
    saved_shape = (c.T * c.K, 2 * c.I)
    for grad in (True, False):
        with torch.set_grad_enabled(grad), _Allocations() as allocs:
            kernels.expert_ffn(x_TH, idx_TK, w_TK, wgu, wd, ids, cgu.requires_grad_(), cd.requires_grad_(), backend="triton")
        assert (saved_shape in allocs.shapes) == grad, allocs.shapes
