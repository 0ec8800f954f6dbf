"""The inner loop of one round: H AdamW steps on the selected experts, resumable after kill -9.

The trainer's state (compact expert tensors, AdamW moments, step; the data position is the step)
is saved atomically every `checkpoint_every` steps and when asked to stop, into the round's work
directory. A restart with the same round, version, data and selection continues from there and
ends with the same delta as an uninterrupted run.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from expertmesh.node.miner.config import TrainSection
from expertmesh.node.miner.metrics import MinerMetrics
from expertmesh.node.miner.progress import Progress
from expertmesh.node.moe import MoEModel
from expertmesh.node.train import SelectiveExperts, TrainConfig, Trainer


class Stopped(Exception):
    """The daemon was asked to stop (SIGTERM); the inner state is saved."""


@dataclass(frozen=True)
class InnerResult:
    delta: dict[str, torch.Tensor]  # canonical key -> trained − base (fp32)
    tokens: int  # tokens trained on this round, all sessions together
    resumed_from: int
    losses: list[float]


def run_inner(moe: MoEModel, selection: dict[int, list[int]], rows_NL: torch.Tensor, cfg: TrainSection,
              round_seed: int, state_dir: Path, progress: Progress, metrics: MinerMetrics,
              stop: Callable[[], bool]) -> InnerResult:
    tc = TrainConfig(steps=cfg.steps, lr=cfg.lr, batch_size=cfg.batch_size, seed=cfg.seed + round_seed)
    torch.manual_seed(tc.seed)
    sel = SelectiveExperts(moe, selection)
    trainer = Trainer(sel, rows_NL, tc)
    resumed_from = 0
    if (state_dir / "state.json").is_file():
        try:
            trainer.load_state(state_dir)
            resumed_from = trainer.step
            progress.line(f"resuming the inner loop from step {resumed_from}/{tc.steps} ({state_dir})")
        except ValueError as exc:  # a selection changed under us: start this round's steps afresh
            progress.line(f"discarding saved inner state: {exc}")
            trainer = Trainer(sel, rows_NL, tc)
    seq_len = rows_NL.shape[1]
    t0, step0 = time.monotonic(), trainer.step

    def on_step(step: int, loss: float) -> None:
        rate = (step - step0) * tc.batch_size * seq_len / max(time.monotonic() - t0, 1e-9)
        metrics.inner_step.set(step)
        metrics.train_loss.set(loss)
        metrics.tokens_per_second.set(rate)
        metrics.tokens.inc(tc.batch_size * seq_len)
        progress.steps("train step", step, tc.steps, f"loss {loss:.4f}  {rate:,.0f} tok/s")
        if step < tc.steps and step % cfg.checkpoint_every == 0:
            trainer.save_state(state_dir)
        if stop() and step < tc.steps:
            trainer.save_state(state_dir)
            raise Stopped(f"stopped at inner step {step}/{tc.steps}; the next start resumes there")

    try:
        trainer.train(on_step=on_step)
        delta = sel.delta()
    finally:
        sel.detach()
    return InnerResult(delta, tc.steps * tc.batch_size * seq_len, resumed_from, list(trainer.losses))
