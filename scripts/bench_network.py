"""The network against one machine: per-domain held-out loss after every round.

  python scripts/bench_network.py [--rounds 10] [--steps 30] [--out docs/benchmarks.json]

1. network: `expertmesh demo --rounds R` (bootstrap, validator, one miner per domain, real processes
   on 127.0.0.1), its held-out loss per domain after every published round and each round's scores.
2. esft: one machine, each domain alone: the same ESFT selection rule (p, profile tokens), the same
   inner settings and training rows, R·H steps, measured every H steps (the same compute per domain).
3. full: one machine, full fine-tuning of every parameter on the three domains' rows interleaved,
   3·R·H steps (the network's total compute), lr --full-lr, measured every 3·H steps.
Held-out rows are the demo's (the validator's split, --eval-tokens per domain). Goals (issue text):
every domain improves every round; no version worse than its parent plus that domain's accepted delta
(parent − score) by more than 0.002; the network keeps ≥ 90% of the esft gain per domain.
Writes docs/benchmarks.json["network"] and docs/network.png; prints the tables.
"""
from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import torch

from expertmesh.node.demo.heldout import HeldOut, domain_sources
from expertmesh.node.demo.network import DemoSettings, write_demo_heldout_key
from expertmesh.node.evaluate import mean_loss
from expertmesh.node.jobs import data_rows
from expertmesh.node.miner.config import SelectSection, TrainSection
from expertmesh.node.moe import load_model
from expertmesh.node.paths import DEFAULT_MODEL
from expertmesh.node.profile import RoutingProfile, batches
from expertmesh.node.select import select_experts
from expertmesh.node.train import SelectiveExperts, Trainer, batch_indices
from expertmesh.protocol.heldout import DEFAULT_FRACTION, split

DOMAINS = ("math", "literature", "code")
REPO = Path(__file__).resolve().parents[1]


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run_network(rounds: int, steps: int, eval_tokens: int, workdir: Path) -> dict:
    out = workdir / "demo.json"
    cmd = [sys.executable, "-m", "expertmesh", "demo", "--rounds", str(rounds), "--miners", str(len(DOMAINS)),
           "--steps", str(steps), "--eval-tokens", str(eval_tokens), "--json", str(out),
           "--run-dir", str(workdir / "run")]
    log("network: " + " ".join(cmd[2:]))
    subprocess.run(cmd, check=True, cwd=REPO, stdout=sys.stderr)
    doc = json.loads(out.read_text())
    curves = {d: [doc["base_domain_loss"][d]] + [r["domain_loss"][d] for r in doc["rounds"]] for d in DOMAINS}
    scores = [{name.split("-", 2)[2]: s for name, s in r["scores"].items()} for r in doc["rounds"]]
    return {"curves": curves, "scores": scores, "seconds": doc.get("seconds")}


def train_rows(tokenizer, sources, max_tokens: int, seq_len: int, key: bytes) -> dict[str, torch.Tensor]:
    """Each domain's train part as the demo's validator splits it (with its held-out key)."""
    return {d: data_rows(tokenizer, split(sources[d].texts(), DEFAULT_FRACTION, key)[0], max_tokens, seq_len)
            for d in DOMAINS}


def run_esft(rows: dict, held: HeldOut, rounds: int, train: TrainSection, select: SelectSection) -> dict:
    curves = {}
    for d in DOMAINS:
        moe, _ = load_model(DEFAULT_MODEL)
        n = max(1, min(rows[d].shape[0], select.profile_tokens // rows[d].shape[1]))
        profile = RoutingProfile(moe).run(batches(rows[d][:n], 16)).to_json()
        chosen = select_experts(profile, select.score, select.p, select.min_per_layer, select.max_per_layer or None)
        sel = SelectiveExperts(moe, chosen)
        torch.manual_seed(train.seed)
        trainer = Trainer(sel, rows[d], train.model_copy(update={"steps": rounds * train.steps}))
        curve = [mean_loss(moe.model, held.rows_NL[d])]
        for r in range(1, rounds + 1):
            trainer.train(until=r * train.steps)
            curve.append(mean_loss(moe.model, held.rows_NL[d]))  # the compact experts are live in the forward
        sel.detach()
        curves[d] = curve
        log(f"esft {d} ({len(chosen)} experts): " + " ".join(f"{x:.4f}" for x in curve))
    return {"curves": curves}


def run_full(rows: dict, held: HeldOut, rounds: int, train: TrainSection, lr: float) -> dict:
    moe, _ = load_model(DEFAULT_MODEL)
    model = moe.model
    params = list(model.parameters())
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=lr, betas=(train.beta1, train.beta2), weight_decay=train.weight_decay)
    n = min(r.shape[0] for r in rows.values())
    mix_NL = torch.stack([rows[d][:n] for d in DOMAINS], dim=1).flatten(0, 1)  # interleaved: one row per domain
    per_round = len(DOMAINS) * train.steps
    curves = {d: [mean_loss(model, held.rows_NL[d])] for d in DOMAINS}
    step = 0
    for r in range(1, rounds + 1):
        model.train()
        for _ in range(per_round):
            ids_BL = mix_NL[batch_indices(mix_NL.shape[0], train.batch_size, step, train.seed)]
            model(input_ids=ids_BL, labels=ids_BL).loss.backward()
            torch.nn.utils.clip_grad_norm_(params, train.clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            step += 1
        for d in DOMAINS:
            curves[d].append(mean_loss(model, held.rows_NL[d]))
        log(f"full round {r}: " + " ".join(f"{d} {curves[d][-1]:.4f}" for d in DOMAINS))
    return {"curves": curves, "lr": lr, "steps": step}


def goals(net: dict, esft: dict, tolerance: float = 0.002) -> dict:
    c, rounds = net["curves"], len(net["scores"])
    worse = [(d, r) for d in DOMAINS for r in range(1, rounds + 1) if c[d][r] >= c[d][r - 1]]
    gaps = {}
    for d in DOMAINS:
        gaps[d] = []
        for r in range(1, rounds + 1):
            score = net["scores"][r - 1].get(d)
            gaps[d].append(None if score is None else round(c[d][r] - (c[d][r - 1] - score), 5))
    over = [(d, r + 1, g) for d in DOMAINS for r, g in enumerate(gaps[d]) if g is not None and g > tolerance]
    keep = {d: round((c[d][0] - c[d][-1]) / (esft["curves"][d][0] - esft["curves"][d][-1]), 3) for d in DOMAINS}
    return {"every_domain_every_round": not worse, "worse": worse, "gap_vs_parent_plus_own_delta": gaps,
            "gap_over_0.002": over, "keep_of_esft_gain": keep, "keep_goal_0.9": all(k >= 0.9 for k in keep.values())}


def plot(result: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(DOMAINS), figsize=(4.2 * len(DOMAINS), 3.4))
    for ax, d in zip(axes, DOMAINS):
        for name, style in (("network", "o-"), ("esft", "s--"), ("full", "^:")):
            curve = result[name]["curves"][d]
            ax.plot(range(len(curve)), curve, style, label=name, markersize=3)
        ax.set_title(d)
        ax.set_xlabel("round (H inner steps per domain)")
        ax.set_ylabel("held-out loss (nats/token)")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def table(result: dict) -> str:
    rounds = len(result["network"]["scores"])
    head = "| domain | run | " + " | ".join(["base"] + [f"r{r}" for r in range(1, rounds + 1)]) + " |"
    lines = [head, "|---|---|" + "---|" * (rounds + 1)]
    for d in DOMAINS:
        for name in ("network", "esft", "full"):
            lines.append(f"| {d} | {name} | " + " | ".join(f"{x:.4f}" for x in result[name]["curves"][d]) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--steps", type=int, default=TrainSection().steps, help="H inner steps per round")
    ap.add_argument("--eval-tokens", type=int, default=16_384)
    ap.add_argument("--full-lr", type=float, default=3e-4, help="full fine-tuning lr (the better of 3e-4, 1e-3)")
    ap.add_argument("--out", type=Path, default=REPO / "docs" / "benchmarks.json")
    ap.add_argument("--plot", type=Path, default=REPO / "docs" / "network.png")
    args = ap.parse_args()
    t0 = time.time()
    train, select = TrainSection(steps=args.steps), SelectSection()
    with tempfile.TemporaryDirectory() as tmp:
        net = run_network(args.rounds, args.steps, args.eval_tokens, Path(tmp))
        _, tokenizer = load_model(DEFAULT_MODEL)
        sources = domain_sources(Path(tmp))
        key = write_demo_heldout_key(Path(tmp) / "run")  # the demo's validator's (fixed) key
        held = HeldOut(sources, tokenizer, args.eval_tokens, key)
        rows = train_rows(tokenizer, sources, DemoSettings().max_tokens, train.seq_len, key)
    esft = run_esft(rows, held, args.rounds, train, select)
    full = run_full(rows, held, args.rounds, train, args.full_lr)
    result = {"date": date.today().isoformat(), "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads",
              "command": "python scripts/bench_network.py " + " ".join(sys.argv[1:]), "rounds": args.rounds,
              "steps": args.steps, "eval_tokens": args.eval_tokens, "network": net, "esft": esft, "full": full,
              "seconds": round(time.time() - t0)}
    result["goals"] = goals(net, esft)
    doc = json.loads(args.out.read_text()) if args.out.is_file() else {}
    doc["network"] = result
    args.out.write_text(json.dumps(doc, indent=1) + "\n")
    plot(result, args.plot)
    print(table(result))
    print(json.dumps(result["goals"], indent=1))
    print(f"wrote {args.out} (network) and {args.plot}; {result['seconds']} s")


if __name__ == "__main__":
    main()
