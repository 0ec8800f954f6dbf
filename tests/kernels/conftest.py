"""Kernel tests run the Triton kernels everywhere: compiled on a CUDA device, else on CPU in Triton's
interpreter. Triton fixes that mode when it is first imported, so it is set here, before any test
module imports kernels' Triton code (kernels imports triton lazily, only when a Triton path runs).
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def triton_device() -> torch.device:
    """Where the Triton backend runs in this session: CUDA when present, else the CPU interpreter."""
    from expertmesh.kernels.dispatch import choose_backend

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    assert choose_backend(dev, "triton") == "triton"  # fails loudly if triton was imported in the wrong mode
    return dev
