"""Copy detection against honest same-domain miners: the false-positive rate and what a copier keeps.

  python scripts/bench_copies.py [--miners 6] [--steps 30] [--out docs/benchmarks.json]

Honest miners: `--miners` math miners, each on its own disjoint shard of GSM8K's train split (the
validator's secret split of the shipped corpus), each with its own seed, each doing what a miner
does (profile, ESFT selection at the miner's p, AdamW steps at the miner's lr), all from the same
base model. Each honest delta, in arrival order, is judged against every earlier one by the
validator's own code: cosine, and the copy rule (validator/scoring.py `nearest`, `residual`: the
delta minus its projection on the span of the `copy_span` earlier deltas most like it must itself
pass the noise rule, z ≥ copy_z).
Copiers: the first honest delta, scaled by s and buried in Gaussian noise of ‖noise‖ = k·‖s·Δ‖, and
cut to half its experts; for each, its cosine to the original, its own score and z (what it would be
paid without the rule), and its residual z. Writes docs/benchmarks.json["copies"]; prints the table.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from datetime import date
from pathlib import Path

import torch

from expertmesh.node.domains import domain_texts
from expertmesh.node.evaluate import row_losses
from expertmesh.node.jobs import data_rows, heldout_rows
from expertmesh.node.miner.config import SelectSection, TrainSection
from expertmesh.node.moe import load_model
from expertmesh.node.paths import DEFAULT_MODEL
from expertmesh.node.profile import RoutingProfile, batches
from expertmesh.node.select import select_experts
from expertmesh.node.train import SelectiveExperts, TrainConfig, Trainer
from expertmesh.protocol.experts import ExpertSet
from expertmesh.protocol.heldout import DEFAULT_FRACTION, split
from expertmesh.validator.config import ScoringSection
from expertmesh.validator.scoring import applied, loss_grads, nearest, residual, sign_z

REPO = Path(__file__).resolve().parents[1]
KEY = b"bench_copies: a fixed held-out key, so runs compare".ljust(32, b".")[:32]


def train(moe, tokenizer, texts: list[str], steps: int, seed: int) -> dict[str, torch.Tensor]:
    base = {k: moe.weight(k).clone() for k in moe.expert_shapes()}
    torch.manual_seed(seed)
    rows = data_rows(tokenizer, texts, 400 * 256)
    selection = select_experts(RoutingProfile(moe).run(batches(rows[:64], 8)).to_json(), "token", SelectSection().p)
    sel = SelectiveExperts(moe, selection)
    t = TrainSection()
    Trainer(sel, rows, TrainConfig(steps=steps, lr=t.lr, batch_size=t.batch_size, seed=seed)).train()
    delta = sel.delta()
    sel.detach()
    with torch.no_grad():
        for k, w in base.items():
            moe.weight(k).copy_(w)
    return delta


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--miners", type=int, default=6)
    ap.add_argument("--steps", type=int, default=TrainSection().steps)
    ap.add_argument("--shard", type=int, default=800, help="train records per honest miner")
    ap.add_argument("--out", type=Path, default=REPO / "docs" / "benchmarks.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    t0 = time.time()
    scoring = ScoringSection()
    moe, tokenizer = load_model(DEFAULT_MODEL)
    moe.model.eval()
    train_texts, held = split(domain_texts("math"), DEFAULT_FRACTION, key=KEY)
    rows = heldout_rows(tokenizer, held, KEY, scoring.eval_tokens, scoring.seq_len)
    base = float(row_losses(moe.model, rows, scoring.batch_size).mean())

    def judge(delta: dict[str, torch.Tensor], earlier: list[dict[str, torch.Tensor]]) -> dict:
        with applied(moe, delta):
            after = float(row_losses(moe.model, rows, scoring.batch_size).mean())
        g = loss_grads(moe, ExpertSet.from_keys(delta), rows, scoring.batch_size)
        near = nearest(delta, ((str(i), e) for i, e in enumerate(earlier)), scoring.copy_span)
        out = {"score": base - after, "z": sign_z(g, delta), "cosine": near.cosine}
        if near.related:
            r, c = residual(delta, [t for _, t in near.related])
            out |= {"residual_z": sign_z(g, r), "projected_on": len(c), "coefficients": [round(x, 3) for x in c]}
        return out

    honest = []
    print(f"base math held-out loss {base:.4f} on {rows.shape[0]} rows; {args.miners} honest miners × "
          f"{args.steps} steps", file=sys.stderr)
    for i in range(args.miners):
        shard = train_texts[i * args.shard:(i + 1) * args.shard]
        honest.append(train(moe, tokenizer, shard, args.steps, seed=1000 + i))
    honest_rows = []
    for i, d in enumerate(honest):
        row = {"miner": i, **judge(d, honest[:i])}
        honest_rows.append(row)
        print(f"honest {i}: score {row['score']:.4f} z {row['z']:.1f} max cos {row['cosine']:.3f} "
              f"residual z {row.get('residual_z', float('nan')):.1f}", file=sys.stderr)

    original = honest[0]
    g = torch.Generator().manual_seed(7)
    copies = []
    keys = sorted(original)
    half = set(sorted({k.rsplit(".", 1)[0] for k in keys})[::2])
    variants = [(s, k, "all") for s in (1.0, 0.5, 0.25) for k in (0.0, 0.5, 1.0, 2.0, 4.0)]
    variants += [(1.0, k, "half") for k in (0.0, 1.0)]
    for s, k, part in variants:
        src = {key: v for key, v in original.items() if part == "all" or key.rsplit(".", 1)[0] in half}
        size = sum(float(v.pow(2).sum()) for v in src.values()) ** 0.5 * s
        noise = {key: torch.randn(v.shape, generator=g) for key, v in src.items()}
        nn = sum(float(v.pow(2).sum()) for v in noise.values()) ** 0.5
        copy = {key: s * v + (k * size / nn) * noise[key] for key, v in src.items()}
        row = {"scale": s, "noise": k, "experts": part, **judge(copy, [original])}
        copies.append(row)
        print(f"copy s={s} noise={k}×{part}: score {row['score']:.4f} z {row['z']:.1f} cos {row['cosine']:.3f} "
              f"residual z {row['residual_z']:.1f}", file=sys.stderr)

    copy_z = scoring.min_z
    flagged = [r for r in honest_rows[1:] if r["residual_z"] < copy_z]
    caught = [r for r in copies if r["z"] >= scoring.min_z and r["residual_z"] < copy_z]
    payable = [r for r in copies if r["z"] >= scoring.min_z and r["score"] > scoring.min_score]
    result = {
        "date": date.today().isoformat(), "machine": platform.machine(), "seconds": round(time.time() - t0),
        "settings": {"miners": args.miners, "steps": args.steps, "shard_records": args.shard,
                     "p": SelectSection().p, "lr": TrainSection().lr, "eval_tokens": scoring.eval_tokens,
                     "copy_z": copy_z, "min_z": scoring.min_z, "copy_cosine": scoring.copy_cosine},
        "base_loss": base, "honest": honest_rows, "copies": copies,
        "honest_false_positives": f"{len(flagged)} of {len(honest_rows) - 1}",
        "copies_caught": f"{len(caught)} of {len(payable)} that the noise rule alone would pay",
        "cosine_rule_caught": f"{sum(r['cosine'] > scoring.copy_cosine for r in payable)} of {len(payable)}",
    }
    print(json.dumps({k: result[k] for k in ("honest_false_positives", "copies_caught", "cosine_rule_caught")}))
    doc = json.loads(args.out.read_text()) if args.out.exists() else {}
    doc["copies"] = result
    args.out.write_text(json.dumps(doc, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
