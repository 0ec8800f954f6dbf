"""Pick the Triton kernels on CUDA tensors and the plain-PyTorch reference elsewhere.

Legend: T tokens, K top-k, E experts, S selected (trainable) experts, H hidden, I expert
intermediate size.

backend: "auto" (default) is Triton when the tensors are on CUDA and triton imports, else the
reference; "reference" and "triton" force one. The EXPERTMESH_KERNELS environment variable sets
the default for a whole process; tests set it to "triton" together with TRITON_INTERPRET=1 to run
the Triton kernels on CPU in Triton's interpreter (which fixes its mode when triton is imported).
"""
from __future__ import annotations

import functools
import os

import torch

from . import reference

BACKENDS = ("auto", "reference", "triton")


@functools.cache
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def interpreting() -> bool:
    """Whether triton runs in its CPU interpreter; fixed process-wide by TRITON_INTERPRET at its import."""
    if not triton_available():
        return False
    import triton

    return bool(triton.knobs.runtime.interpret)


def choose_backend(device: torch.device, backend: str | None = None) -> str:
    """The backend a call on tensors of this device will use: "reference" or "triton"."""
    backend = backend or os.environ.get("EXPERTMESH_KERNELS") or "auto"
    if backend not in BACKENDS:
        raise ValueError(f"unknown kernels backend {backend!r}; use one of {', '.join(BACKENDS)}")
    if backend == "auto":
        return "triton" if device.type == "cuda" and triton_available() else "reference"
    if backend == "triton":
        if not triton_available():
            raise ValueError("the triton backend needs the triton package (pip install -e '.[gpu]')")
        if device.type != "cuda" and not interpreting():
            raise ValueError("the triton backend runs CPU tensors only in Triton's interpreter: "
                             "set TRITON_INTERPRET=1 before triton is imported, or use backend='reference'")
        if device.type == "cuda" and interpreting():
            raise ValueError("triton was imported with TRITON_INTERPRET=1, which cannot run CUDA kernels; unset it")
    return backend


def expert_ffn(
    x_TH: torch.Tensor,
    topk_idx_TK: torch.Tensor,
    topk_w_TK: torch.Tensor,
    w_gate_up_E2IH: torch.Tensor,
    w_down_EHI: torch.Tensor,
    trainable_ids_S: torch.Tensor | None = None,
    w_gate_up_S2IH: torch.Tensor | None = None,
    w_down_SHI: torch.Tensor | None = None,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """Routed SwiGLU experts, y = sum_k w_tk * down_e(silu(gate_e x) * up_e x); see reference.expert_ffn.

    Selective training: pass frozen base weights (requires_grad False) and the compact trainable
    tensors of experts trainable_ids_S (requires_grad True); gradients then reach only the compact
    tensors, x and the routing weights. On Triton no gradient buffer of a frozen expert exists.
    """
    _check_ffn_args(x_TH, topk_idx_TK, topk_w_TK, w_gate_up_E2IH, w_down_EHI, trainable_ids_S, w_gate_up_S2IH, w_down_SHI)
    if choose_backend(x_TH.device, backend) == "reference":
        return reference.expert_ffn(x_TH, topk_idx_TK, topk_w_TK, w_gate_up_E2IH, w_down_EHI,
                                    trainable_ids_S, w_gate_up_S2IH, w_down_SHI)
    from .ffn_triton import expert_ffn_triton

    if trainable_ids_S is None and (w_gate_up_E2IH.requires_grad or w_down_EHI.requires_grad):
        # Plain full fine-tuning: every expert is trainable and the base is its own compact tensor.
        E = w_gate_up_E2IH.shape[0]
        trainable_ids_S = torch.arange(E, device=x_TH.device)
        w_gate_up_S2IH, w_down_SHI = w_gate_up_E2IH, w_down_EHI
    return expert_ffn_triton(x_TH, topk_idx_TK, topk_w_TK, w_gate_up_E2IH, w_down_EHI,
                             trainable_ids_S, w_gate_up_S2IH, w_down_SHI)


def _check_ffn_args(x_TH, topk_idx_TK, topk_w_TK, w_gu_E2IH, w_d_EHI, ids_S, w_gu_S2IH, w_d_SHI) -> None:
    if x_TH.dim() != 2 or topk_idx_TK.dim() != 2 or topk_w_TK.shape != topk_idx_TK.shape:
        raise ValueError("expected x [T, H], topk_idx [T, K] and topk_w [T, K]")
    E, I2, H = w_gu_E2IH.shape
    if x_TH.shape[1] != H or w_d_EHI.shape != (E, H, I2 // 2) or I2 % 2:
        raise ValueError(f"expected gate_up [E, 2I, H] and down [E, H, I] matching x's hidden {x_TH.shape[1]}")
    if (ids_S is None) != (w_gu_S2IH is None) or (ids_S is None) != (w_d_SHI is None):
        raise ValueError("trainable_ids_S, w_gate_up_S2IH and w_down_SHI go together: pass all three or none")
    weights = [w_gu_E2IH, w_d_EHI] + ([] if ids_S is None else [w_gu_S2IH, w_d_SHI])
    if any(w.dtype != x_TH.dtype for w in weights):
        raise ValueError(f"x and all expert weights must share one dtype (x is {x_TH.dtype}); cast x to the weights' dtype")
    if ids_S is not None:
        S = ids_S.numel()
        if w_gu_S2IH.shape != (S, I2, H) or w_d_SHI.shape != (S, H, I2 // 2):
            raise ValueError(f"compact trainable tensors must be [S={S}, 2I, H] and [S, H, I]")
        if (w_gu_E2IH.requires_grad or w_d_EHI.requires_grad) and S:
            raise ValueError("with compact trainable tensors the base weights must be frozen (requires_grad=False)")
