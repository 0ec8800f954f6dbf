"""Delta coding kernel vs the protocol codec's reference functions.

Legend: S selected experts, E experts, I intermediate, H hidden, N blocks per expert, B block, k kept.
int8 coding must be bit-identical. Top-k is identical where magnitudes are distinct; on ties (common
in half-precision deltas) any lowest-magnitude choice is valid, so those cases check the invariants.
"""
import pytest
import torch

from expertmesh import kernels
from expertmesh.kernels import reference

E, I, H = 5, 12, 20
IDS = [4, 1, 2]
VIEWS = {"gate": lambda w: w[:, :I], "up": lambda w: w[:, I:], "down_like": lambda w: w}


def weights(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(E, 2 * I, H, generator=g).to(dtype)
    trained = (base[IDS].float() + 0.02 * torch.randn(len(IDS), 2 * I, H, generator=g)).to(dtype)
    return trained, base


def both(view, dtype, block, keep, with_ef, device):
    trained, base = weights(dtype)
    tv, bv = VIEWS[view](trained), VIEWS[view](base)
    ef = 1e-3 * torch.randn(tv.shape, generator=torch.Generator().manual_seed(9)) if with_ef else None
    ef_ref = None if ef is None else ef.clone()
    ef_dev = None if ef is None else ef.to(device)
    got = kernels.delta_quantize(tv.to(device), bv.to(device), torch.tensor(IDS, device=device), block, keep, ef_dev,
                                 backend="triton")
    want = reference.delta_quantize(tv, bv, torch.tensor(IDS), block, keep, ef_ref)
    return [t.cpu() for t in got], want, None if ef is None else (ef_dev.cpu(), ef_ref), tv.float() - bv[IDS].float()


@pytest.mark.parametrize("view", list(VIEWS))
@pytest.mark.parametrize("dtype,block,with_ef", [
    (torch.float32, 64, False), (torch.bfloat16, 50, True), (torch.float16, 240, False), (torch.bfloat16, 7, False),
], ids=["fp32-b64", "bf16-b50-ef", "fp16-b240", "bf16-b7"])
def test_int8_bit_identical(view, dtype, block, with_ef, triton_device):
    (q, scale), (q_ref, scale_ref), ef, _ = both(view, dtype, block, None, with_ef, triton_device)
    assert q.dtype == torch.int8 and scale.dtype == torch.float32
    assert torch.equal(q, q_ref) and torch.equal(scale, scale_ref)
    if ef:
        assert torch.equal(*ef)


@pytest.mark.parametrize("view,block,keep", [("gate", 64, 5), ("down_like", 37, 37), ("up", 256, 3)])
def test_topk_identical_without_ties(view, block, keep, triton_device):
    # fp32 deltas plus a random error-feedback term have no two equal magnitudes in a block
    (idx, val), (idx_ref, val_ref), ef, _ = both(view, torch.float32, block, keep, True, triton_device)
    assert idx.dtype == torch.int16 and val.dtype == torch.float32
    assert torch.equal(idx, idx_ref) and torch.equal(val, val_ref)
    assert torch.equal(*ef)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_topk_with_ties_keeps_a_valid_top_k(dtype, triton_device):
    block, keep = 64, 5
    (idx, val), (idx_ref, val_ref), _, delta = both("gate", dtype, block, keep, False, triton_device)
    assert (idx[..., 1:] > idx[..., :-1]).all(), "indices must be strictly ascending inside a block"
    assert torch.equal(val.abs().sort(-1).values, val_ref.abs().sort(-1).values)
    for s in range(len(IDS)):
        dense = reference.topk_blockwise_scatter(idx[s], val[s], block, tuple(delta[s].shape))
        kept = dense != 0
        assert torch.equal(dense[kept], delta[s][kept])  # kept values are the delta's own entries


def test_error_feedback_loses_nothing_over_rounds(triton_device):
    """Sum of decoded updates + final residual == sum of the raw deltas (the point of error feedback)."""
    trained, base = weights(torch.float32, seed=5)
    tv, bv = VIEWS["down_like"](trained).to(triton_device), VIEWS["down_like"](base).to(triton_device)
    ids = torch.tensor(IDS, device=triton_device)
    ef = torch.zeros(tv.shape, device=triton_device)
    decoded_sum = torch.zeros(tv.shape)
    for _ in range(3):
        idx, val = kernels.delta_quantize(tv, bv, ids, 32, 4, ef, backend="triton")
        q, scale = kernels.delta_quantize(tv, bv, ids, 32, None, None, backend="triton")
        for s in range(len(IDS)):
            decoded_sum[s] += reference.topk_blockwise_scatter(idx[s].cpu(), val[s].cpu(), 32, tuple(tv[s].shape))
            assert reference.int8_blockwise_dequantize(q[s].cpu(), scale[s].cpu(), tuple(tv[s].shape)).sub(
                tv[s].cpu() - bv[IDS[s]].cpu()).abs().max() <= scale[s].max().item() / 2 + 1e-7
    raw = 3 * (tv.cpu() - bv[IDS].cpu())
    torch.testing.assert_close(decoded_sum + ef.cpu(), raw, rtol=1e-5, atol=1e-6)


def test_rejects_bad_arguments():
    trained, base = weights(torch.float32)
    with pytest.raises(ValueError, match="keep"):
        kernels.delta_quantize(trained, base, torch.tensor(IDS), 16, 17)
    with pytest.raises(ValueError, match="ef_SX"):
        kernels.delta_quantize(trained, base, torch.tensor(IDS), 16, None, torch.zeros(3, 2))
    with pytest.raises(ValueError, match="one expert per"):
        kernels.delta_quantize(trained, base, torch.tensor(IDS[:2]), 16)


def test_int8_rounds_half_to_even_like_torch(triton_device):
    """Deltas that land exactly on .5 steps (scale 1) must round as torch.round does: to even."""
    delta = torch.tensor([127.0, 2.5, 3.5, -2.5, -3.5, 0.5, -0.5, 1.5, 126.5, -127.0, 0.0, 4.25])
    base = torch.randn(2, delta.numel(), generator=torch.Generator().manual_seed(1)).round()  # exact in fp32
    trained = (base[1] + delta)[None]
    q, scale = kernels.delta_quantize(trained.to(triton_device), base.to(triton_device),
                                      torch.tensor([1], device=triton_device), 16, backend="triton")
    assert scale.item() == 1.0
    assert q.cpu()[0, 0, :12].tolist() == torch.round(delta).to(torch.int8).tolist()
