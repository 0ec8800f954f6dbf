"""The inner loop of one round: H AdamW steps on the selected experts, resumable after kill -9.

The trainer's state (compact expert tensors, AdamW moments, step; the data position is the step)
is saved atomically every `checkpoint_every` steps and when asked to stop, into the round's work
directory. A restart with the same round, version, data and selection continues from there and
ends with the same delta as an uninterrupted run.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from expertmesh.node.miner.config import TrainSection
from expertmesh.node.miner.metrics import MinerMetrics
from expertmesh.node.miner.progress import Progress
from expertmesh.node.moe import MoEModel
from expertmesh.node.train import SelectiveExperts, train_resumable
from expertmesh.protocol.experts import ExpertSet


@dataclass(frozen=True)
class InnerResult:
    delta: dict[str, torch.Tensor]  # canonical key -> trained − base (fp32)
    tokens: int  # tokens trained on this round, all sessions together
    resumed_from: int
    losses: list[float]


def run_inner(moe: MoEModel, selection: ExpertSet, rows_NL: torch.Tensor, cfg: TrainSection,
              round_seed: int, state_dir: Path, progress: Progress, metrics: MinerMetrics,
              stop: Callable[[], bool]) -> InnerResult:
    tc = cfg.model_copy(update={"seed": cfg.seed + round_seed})  # each round its own batch order
    torch.manual_seed(tc.seed)
    sel = SelectiveExperts(moe, selection)

    def report(step: int, loss: float, rate: float) -> None:
        metrics.inner_step.set(step)
        metrics.train_loss.set(loss)
        metrics.tokens_per_second.set(rate)
        metrics.tokens.inc(tc.batch_size * rows_NL.shape[1])
        progress.steps("train step", step, tc.steps, f"loss {loss:.4f}  {rate:,.0f} tok/s")

    try:
        trainer, resumed_from = train_resumable(sel, rows_NL, tc, state_dir, cfg.checkpoint_every, report,
                                                progress.line, stop, discard_mismatch=True)
        delta = sel.delta()
    finally:
        sel.detach()
    return InnerResult(delta, tc.steps * tc.batch_size * rows_NL.shape[1], resumed_from, list(trainer.losses))
