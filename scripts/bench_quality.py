"""The ESFT frontier: in-domain gain against forgetting, ESFT against the alternatives, on the shipped model.

  python scripts/bench_quality.py [--steps 150] [--out docs/benchmarks.json]

Every run trains on math's train rows (8 × 256 tokens a step, AdamW with the trainer's betas, weight
decay and clip, the same batch order) from the base model, then measures held-out loss on math
(the gain) and on literature and code (forgetting: the loss they gain). Runs: full fine-tuning, all
experts trainable, LoRA on the experts (peft target_parameters), ESFT over p ∈ {0.2, 0.3, 0.5} with
token scores (and gate scores at the best lr), ESFT with the selected layers' routers trainable, and
random experts of ESFT's count per layer; each alternative over a small lr sweep. Goal (issue text):
an ESFT setting with ≥ 80% of the best full fine-tuning gain at ≤ 10% of its forgetting.
Writes docs/benchmarks.json["quality"] and docs/quality.png; prints the table.
"""
from __future__ import annotations

import argparse
import json
import platform
import random
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import torch

from expertmesh.node.demo.heldout import HeldOut, domain_sources
from expertmesh.node.evaluate import mean_loss
from expertmesh.node.jobs import data_rows
from expertmesh.node.moe import load_model
from expertmesh.node.paths import DEFAULT_MODEL
from expertmesh.node.profile import RoutingProfile, batches
from expertmesh.node.select import select_experts
from expertmesh.node.train import SelectiveExperts, TrainConfig, batch_indices
from expertmesh.protocol.experts import ExpertSet
from expertmesh.protocol.heldout import DEFAULT_FRACTION, split

REPO = Path(__file__).resolve().parents[1]
OTHERS = ("literature", "code")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def train_loop(model, params: list, rows_NL: torch.Tensor, cfg: TrainConfig) -> tuple[float, int]:
    """The trainer's loop (node.train.Trainer) over any parameter list; (tokens/s, optimizer state bytes)."""
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), weight_decay=cfg.weight_decay)
    model.train()
    t0 = time.perf_counter()
    for step in range(cfg.steps):
        ids_BL = rows_NL[batch_indices(rows_NL.shape[0], cfg.batch_size, step, cfg.seed)]
        model(input_ids=ids_BL, labels=ids_BL).loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
    rate = cfg.steps * cfg.batch_size * rows_NL.shape[1] / (time.perf_counter() - t0)
    state = sum(t.numel() * t.element_size() for st in opt.state.values() for t in st.values() if torch.is_tensor(t))
    return rate, state


def esft_selection(moe, rows_NL, p: float, score: str) -> ExpertSet:
    profile = RoutingProfile(moe).run(batches(rows_NL[:64], 16)).to_json()  # 16,384 tokens, as the miner
    return select_experts(profile, score, p)


def run(kind: str, lr: float, rows_NL, held: HeldOut, steps: int, experts: ExpertSet | None = None,
        routers: bool = False) -> dict:
    moe, _ = load_model(DEFAULT_MODEL)
    torch.manual_seed(0)
    cfg = TrainConfig(steps=steps, lr=lr)
    model, sel = moe.model, None
    for p in model.parameters():
        p.requires_grad_(False)
    if kind == "full":
        params = list(model.parameters())
    elif kind == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=[],
                                                 target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]))
        params = [p for p in model.parameters() if p.requires_grad]
    else:  # experts: ESFT, random, all
        sel = SelectiveExperts(moe, experts)
        params = sel.parameters()
        if routers:
            params += [moe.layer(l).router.weight for l in experts.layers()]
    for p in params:
        p.requires_grad_(True)
    rate, state = train_loop(model, params, rows_NL, cfg)
    after = {d: mean_loss(model, rows) for d, rows in held.rows_NL.items()}
    if sel is not None:
        sel.detach()
    return {"kind": kind, "lr": lr, "experts": None if experts is None else len(experts), "routers": routers,
            "trainable": sum(p.numel() for p in params), "tokens_per_s": round(rate), "optimizer_bytes": state,
            "after": after}


def summarise(r: dict, base: dict) -> dict:
    r["gain"] = round(base["math"] - r["after"]["math"], 5)
    r["forgetting"] = {d: round(r["after"][d] - base[d], 5) for d in OTHERS}
    r["forgetting_mean"] = round(sum(r["forgetting"].values()) / len(OTHERS), 5)
    return r


def plot(runs: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for kind, marker in (("full", "^"), ("all", "D"), ("lora", "v"), ("esft", "o"), ("random", "x")):
        pts = [r for r in runs if r["kind"] == kind]
        ax.scatter([r["forgetting_mean"] for r in pts], [r["gain"] for r in pts], marker=marker, label=kind)
        for r in pts:
            ax.annotate(r["label"], (r["forgetting_mean"], r["gain"]), fontsize=6, xytext=(3, 2),
                        textcoords="offset points")
    ax.set_xlabel("forgetting: mean held-out loss added on literature and code (nats/token)")
    ax.set_ylabel("math held-out loss removed (nats/token)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--eval-tokens", type=int, default=16_384)
    ap.add_argument("--train-tokens", type=int, default=400_000)
    ap.add_argument("--out", type=Path, default=REPO / "docs" / "benchmarks.json")
    ap.add_argument("--plot", type=Path, default=REPO / "docs" / "quality.png")
    args = ap.parse_args()
    t0 = time.time()
    moe, tokenizer = load_model(DEFAULT_MODEL)
    with tempfile.TemporaryDirectory() as tmp:
        sources = domain_sources(Path(tmp))
        held = HeldOut(sources, tokenizer, args.eval_tokens)
        rows_NL = data_rows(tokenizer, split(sources["math"].texts(), DEFAULT_FRACTION)[0], args.train_tokens)
    base = {d: mean_loss(moe.model, rows) for d, rows in held.rows_NL.items()}
    everything = ExpertSet((l.index, e) for l in moe.layers for e in range(l.num_experts))
    sels = {(p, s): esft_selection(moe, rows_NL, p, s) for p in (0.2, 0.3, 0.5) for s in ("token", "gate")}
    runs: list[dict] = []

    def add(label: str, **kw) -> dict:
        r = summarise(run(rows_NL=rows_NL, held=held, steps=args.steps, **kw), base)
        r["label"] = label
        runs.append(r)
        log(f"{label:<24} gain {r['gain']:.4f}  forgetting lit {r['forgetting']['literature']:+.4f} code "
            f"{r['forgetting']['code']:+.4f}  {r['tokens_per_s']:,} tok/s  [{time.time() - t0:.0f} s]")
        return r

    for lr in (3e-4, 1e-3):
        add(f"full lr {lr:g}", kind="full", lr=lr)
    for lr in (1e-3, 3e-3):
        add(f"all experts lr {lr:g}", kind="all", lr=lr, experts=everything)
    for lr in (1e-3, 3e-3):
        add(f"lora r8 lr {lr:g}", kind="lora", lr=lr)
    for p in (0.2, 0.3, 0.5):
        for lr in (1e-3, 3e-3):
            add(f"esft p{p} token lr {lr:g}", kind="esft", lr=lr, experts=sels[(p, "token")])
    esft = [r for r in runs if r["kind"] == "esft"]
    best_lr = max(esft, key=lambda r: r["gain"])["lr"]
    for p in (0.2, 0.3, 0.5):
        add(f"esft p{p} gate lr {best_lr:g}", kind="esft", lr=best_lr, experts=sels[(p, "gate")])
    top = max((r for r in runs if r["kind"] == "esft"), key=lambda r: r["gain"] - r["forgetting_mean"])
    p_top = float(top["label"].split()[1][1:])
    score_top = top["label"].split()[2]
    add(f"esft p{p_top} {score_top} +routers lr {top['lr']:g}", kind="esft", lr=top["lr"],
        experts=sels[(p_top, score_top)], routers=True)
    rng = random.Random(0)
    chosen = sels[(p_top, score_top)].layers()
    rand = ExpertSet((l, e) for l, ids in chosen.items()
                     for e in rng.sample(range(moe.layer(l).num_experts), len(ids)))
    add(f"random {len(rand)} lr {top['lr']:g}", kind="random", lr=top["lr"], experts=rand)

    best_full = max((r for r in runs if r["kind"] == "full"), key=lambda r: r["gain"])
    ok = [r["label"] for r in runs if r["kind"] == "esft" and r["gain"] >= 0.8 * best_full["gain"]
          and r["forgetting_mean"] <= 0.1 * best_full["forgetting_mean"]]
    best_esft = max((r for r in runs if r["kind"] == "esft"), key=lambda r: r["gain"])
    result = {"date": date.today().isoformat(), "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads",
              "command": "python scripts/bench_quality.py " + " ".join(sys.argv[1:]), "steps": args.steps,
              "batch_tokens": 8 * 256, "base": base, "runs": runs, "seconds": round(time.time() - t0),
              "goal": {"best_full": best_full["label"], "esft_meeting_80pct_gain_at_10pct_forgetting": ok,
                       "best_esft_gain_share": round(best_esft["gain"] / best_full["gain"], 3),
                       "best_esft_forgetting_share": round(best_esft["forgetting_mean"] / best_full["forgetting_mean"], 3)}}
    doc = json.loads(args.out.read_text()) if args.out.is_file() else {}
    doc["quality"] = result
    args.out.write_text(json.dumps(doc, indent=1) + "\n")
    plot(runs, args.plot)
    print("| run | math loss removed | literature / code loss added | tokens/s | optimizer state |")
    print("|---|---|---|---|---|")
    for r in runs:
        print(f"| {r['label']} | {r['gain']:.4f} | {r['forgetting']['literature']:+.4f} / {r['forgetting']['code']:+.4f} "
              f"| {r['tokens_per_s']:,} | {r['optimizer_bytes'] / 1e6:.1f} MB |")
    print(json.dumps(result["goal"], indent=1))
    print(f"wrote {args.out} (quality) and {args.plot}; {result['seconds']} s")


if __name__ == "__main__":
    main()
