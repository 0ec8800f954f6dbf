"""Compute kernels (Triton) with plain-PyTorch references and a dispatcher. Imports nothing of ours.

kernels.expert_ffn runs Triton on CUDA tensors and the reference
elsewhere (kernels/dispatch.py); kernels.reference is the oracle every Triton kernel is tested on.
Triton itself is imported only when a Triton path runs.
"""
from .dispatch import choose_backend, expert_ffn

__all__ = ["choose_backend", "expert_ffn"]
