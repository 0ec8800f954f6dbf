"""Routing-profiler overhead against a plain no-grad forward over the same tokens (goal: within 10%).

  python scripts/bench_profile.py [--tokens 65536] [--repeats 5]

Both are timed side by side in one run, alternating, and the medians compared.
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from expertmesh.node.domains import domain_texts
from expertmesh.node.jobs import data_rows
from expertmesh.node.moe import load_model
from expertmesh.node.paths import DEFAULT_MODEL
from expertmesh.node.profile import RoutingProfile, batches


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    ap.add_argument("--tokens", type=int, default=65_536)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    moe, tok = load_model(args.model)
    rows = data_rows(tok, domain_texts("math"), args.tokens)
    moe.model.eval()

    @torch.no_grad()
    def plain() -> None:
        for ids in batches(rows, 16):
            moe.model(input_ids=ids)

    def profiled() -> None:
        RoutingProfile(moe).run(batches(rows, 16))

    plain(), profiled()  # warm-up
    t_plain, t_prof = [], []
    for i in range(args.repeats):
        pair = ((plain, t_plain), (profiled, t_prof))
        for fn, acc in pair if i % 2 == 0 else pair[::-1]:  # alternate which goes first
            t0 = time.perf_counter()
            fn()
            acc.append(time.perf_counter() - t0)
    mp, mq = statistics.median(t_plain), statistics.median(t_prof)
    overhead = 100 * (mq / mp - 1)
    print(f"profile overhead on {rows.numel():,} tokens ({torch.get_num_threads()} threads, median of {args.repeats}): "
          f"plain forward {mp:.3f}s ({rows.numel() / mp:,.0f} tok/s), profiled {mq:.3f}s -> {overhead:+.1f}% "
          f"({'meets' if overhead <= 10 else 'MISSES'} the 10% goal)")


if __name__ == "__main__":
    main()
