"""Routing profiler: per MoE layer and expert, how many tokens it was selected for and its gate mass.

No-grad streaming over batches of packed token rows; one forward hook per router. Tensors in,
statistics out; reading files and writing profile.json happen in the CLI.
"""
from __future__ import annotations

from collections.abc import Iterable

import torch

from expertmesh.node.moe import MoEModel


class RoutingProfile:
    """Accumulates counts[l][e] (tokens routed to e among the top-k) and gate_sum[l][e]."""

    def __init__(self, moe: MoEModel):
        self.moe = moe
        self.tokens = 0
        self.counts = {l.index: torch.zeros(l.num_experts, dtype=torch.long) for l in moe.layers}
        self.gate_sum = {l.index: torch.zeros(l.num_experts, dtype=torch.float64) for l in moe.layers}
        self._hooks = []

    def __enter__(self) -> "RoutingProfile":
        for lay in self.moe.layers:
            self._hooks.append(lay.router.register_forward_hook(self._hook(lay.index)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()

    def _hook(self, index: int):
        counts, gate_sum = self.counts[index], self.gate_sum[index]

        def hook(module, inputs, output):
            _, weights_TK, idx_TK = output
            idx = idx_TK.reshape(-1)
            counts.add_(torch.bincount(idx, minlength=counts.numel()).cpu())
            gate_sum.index_add_(0, idx.cpu(), weights_TK.reshape(-1).detach().double().cpu())

        return hook

    @torch.no_grad()
    def run(self, batches: Iterable[torch.Tensor]) -> "RoutingProfile":
        was_training = self.moe.model.training
        self.moe.model.eval()
        with self:
            for ids_BL in batches:
                self.moe.model(input_ids=ids_BL)
                self.tokens += ids_BL.numel()
        self.moe.model.train(was_training)
        return self

    def to_json(self) -> dict:
        return {
            "model": self.moe.source,
            "architecture": self.moe.arch,
            "tokens": self.tokens,
            "top_k": self.moe.top_k,
            "layers": {str(i): {"counts": self.counts[i].tolist(), "gate_sum": [round(x, 6) for x in self.gate_sum[i].tolist()]}
                       for i in sorted(self.counts)},
        }


def batches(rows_NL: torch.Tensor, batch_size: int) -> Iterable[torch.Tensor]:
    for i in range(0, rows_NL.shape[0], batch_size):
        yield rows_NL[i : i + batch_size]
