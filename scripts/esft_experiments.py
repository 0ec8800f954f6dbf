"""The runtime figures the README reports, measured on the shipped model.

  python scripts/esft_experiments.py [--steps 200] [--sweep-steps 100] [--out docs/esft_results.json]

1. Routing overlap: ESFT selections (token score, p) from profiles of >= 100k tokens: Jaccard of
   math vs literature (goal <= 0.4) and of two disjoint halves of math (goal >= 0.7).
2. A small sweep of learning rate and p on math, scored by held-out math loss after --sweep-steps.
3. ESFT on math for --steps steps next to the same number of randomly chosen experts per layer:
   held-out math, literature and code loss before and after.
Prints a markdown summary and writes every number to --out.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch

from expertmesh.node.domains import DOMAINS, domain_texts
from expertmesh.node.evaluate import mean_loss
from expertmesh.node.jobs import data_rows
from expertmesh.node.moe import load_model
from expertmesh.node.paths import DEFAULT_MODEL
from expertmesh.node.profile import RoutingProfile, batches
from expertmesh.node.select import select_experts
from expertmesh.protocol.experts import ExpertSet
from expertmesh.node.train import SelectiveExperts, TrainConfig, Trainer
from expertmesh.protocol.heldout import DEFAULT_FRACTION, split

PROFILE_TOKENS = 102_400
EVAL_TOKENS = 32_768


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def selection_for(moe, rows, p: float) -> tuple[dict, ExpertSet]:
    prof = RoutingProfile(moe).run(batches(rows, 16)).to_json()
    return prof, select_experts(prof, "token", p)


def train_and_eval(moe, rows, held: dict, selection: ExpertSet, steps: int, lr: float, seed: int = 0) -> dict:
    base = {k: v.clone() for k, v in moe.model.state_dict().items()}
    sel = SelectiveExperts(moe, selection)
    t0 = time.time()
    Trainer(sel, rows, TrainConfig(steps=steps, lr=lr, seed=seed)).train()
    seconds = time.time() - t0
    sel.detach()
    moe.add_delta(sel.delta())
    after = {d: round(mean_loss(moe.model, h), 4) for d, h in held.items()}
    moe.model.load_state_dict(base)
    return {"heldout_after": after, "seconds": round(seconds, 1), "experts": len(selection)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--sweep-steps", type=int, default=100)
    ap.add_argument("--lrs", default="3e-4,1e-3,3e-3")
    ap.add_argument("--ps", default="0.1,0.2,0.3")
    ap.add_argument("--p", type=float, default=0.2, help="p for the overlap figures and the sweep of learning rates")
    ap.add_argument("--out", type=Path, default=Path("docs/esft_results.json"))
    args = ap.parse_args()
    torch.manual_seed(0)
    moe, tok = load_model(args.model)
    splits = {d: split(domain_texts(d), DEFAULT_FRACTION) for d in DOMAINS}
    held = {d: data_rows(tok, ho, EVAL_TOKENS) for d, (_, ho) in splits.items()}
    math_train = splits["math"][0]
    rows_math = data_rows(tok, math_train)
    result: dict = {"model": str(args.model), "eval_tokens_per_domain": {d: h.numel() for d, h in held.items()}}
    base_loss = {d: round(mean_loss(moe.model, h), 4) for d, h in held.items()}
    result["heldout_base"] = base_loss
    log(f"base held-out loss {base_loss}")

    # 1. overlap of selections
    prof_rows = {d: data_rows(tok, splits[d][0], PROFILE_TOKENS) for d in DOMAINS}
    halves = {"math_a": data_rows(tok, math_train[0::2], PROFILE_TOKENS), "math_b": data_rows(tok, math_train[1::2], PROFILE_TOKENS)}
    sels = {name: selection_for(moe, rows, args.p)[1] for name, rows in {**prof_rows, **halves}.items()}
    result["overlap"] = {
        "p": args.p, "profile_tokens": PROFILE_TOKENS,
        "selected": {k: sum(map(len, v.values())) for k, v in sels.items()},
        "jaccard_math_literature": round(sels["math"].jaccard(sels["literature"]), 3),
        "jaccard_math_code": round(sels["math"].jaccard(sels["code"]), 3),
        "jaccard_literature_code": round(sels["literature"].jaccard(sels["code"]), 3),
        "jaccard_math_halves": round(sels["math_a"].jaccard(sels["math_b"]), 3),
    }
    log(f"overlap {result['overlap']}")

    # 2. sweep: learning rate at p, then p at the best learning rate
    sweep = []
    for lr in map(float, args.lrs.split(",")):
        r = train_and_eval(moe, rows_math, {"math": held["math"]}, sels["math"], args.sweep_steps, lr)
        sweep.append({"lr": lr, "p": args.p, **r})
        log(f"sweep {sweep[-1]}")
    best_lr = min(sweep, key=lambda r: r["heldout_after"]["math"])["lr"]
    for p in map(float, args.ps.split(",")):
        if p == args.p:
            continue
        _, s = selection_for(moe, prof_rows["math"], p)
        r = train_and_eval(moe, rows_math, {"math": held["math"]}, s, args.sweep_steps, best_lr)
        sweep.append({"lr": best_lr, "p": p, **r})
        log(f"sweep {sweep[-1]}")
    best = min(sweep, key=lambda r: r["heldout_after"]["math"])
    result["sweep"] = {"steps": args.sweep_steps, "runs": sweep, "best": {"lr": best["lr"], "p": best["p"]}}

    # 3. ESFT vs random experts, same count per layer
    _, esft_sel = selection_for(moe, prof_rows["math"], best["p"])
    rng = random.Random(0)
    n_exp = {l.index: l.num_experts for l in moe.layers}
    random_sel = ExpertSet((l, e) for l, ids in esft_sel.layers().items() for e in rng.sample(range(n_exp[l]), len(ids)))
    result["esft_vs_random"] = {
        "steps": args.steps, "lr": best["lr"], "p": best["p"], "batch_tokens": 8 * 256,
        "esft": train_and_eval(moe, rows_math, held, esft_sel, args.steps, best["lr"]),
        "random": train_and_eval(moe, rows_math, held, random_sel, args.steps, best["lr"]),
        "jaccard_esft_random": round(esft_sel.jaccard(random_sel), 3),
    }
    log(f"esft vs random {result['esft_vs_random']}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
