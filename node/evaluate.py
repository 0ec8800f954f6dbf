"""Held-out loss: mean next-token cross-entropy over fixed rows, per row or overall. Tensors in, numbers out."""
from __future__ import annotations

import torch
import torch.nn.functional as F


@torch.no_grad()
def mean_loss(model: torch.nn.Module, rows_NL: torch.Tensor, batch_size: int = 16) -> float:
    """Mean cross-entropy per predicted token over rows [N, L] (each row predicts L-1 tokens)."""
    if rows_NL.numel() == 0:
        raise ValueError("no evaluation tokens: the held-out split is empty")
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for i in range(0, rows_NL.shape[0], batch_size):
        ids_BL = rows_NL[i : i + batch_size]
        logits_BLV = model(input_ids=ids_BL).logits
        total += F.cross_entropy(logits_BLV[:, :-1].flatten(0, 1).float(), ids_BL[:, 1:].flatten(), reduction="sum").item()
        count += ids_BL[:, 1:].numel()
    model.train(was_training)
    return total / count


def token_losses(model: torch.nn.Module, ids_BL: torch.Tensor) -> torch.Tensor:
    """[B, L-1] float32 next-token cross-entropy of each predicted token (with grad when grad is enabled)."""
    logits_BLV = model(input_ids=ids_BL).logits
    ce = F.cross_entropy(logits_BLV[:, :-1].flatten(0, 1).float(), ids_BL[:, 1:].flatten(), reduction="none")
    return ce.view(ids_BL.shape[0], -1)


@torch.no_grad()
def row_losses(model: torch.nn.Module, rows_NL: torch.Tensor, batch_size: int = 16) -> torch.Tensor:
    """[N] float64: each row's mean cross-entropy over its L-1 predicted tokens (their mean is mean_loss)."""
    if rows_NL.numel() == 0:
        raise ValueError("no evaluation tokens: the held-out split is empty")
    was_training = model.training
    model.eval()
    out = [token_losses(model, rows_NL[i : i + batch_size]).double().mean(1)
           for i in range(0, rows_NL.shape[0], batch_size)]
    model.train(was_training)
    return torch.cat(out)
