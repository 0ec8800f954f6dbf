"""Compute kernels (Triton) with plain-PyTorch references and a dispatcher. Imports nothing of ours."""
