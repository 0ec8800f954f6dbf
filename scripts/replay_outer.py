"""The network's outer loop replayed in one process, to measure merge settings quickly.

Each round, for each domain: route a profile on the round's model, select experts (ESFT), train
them (the miner's TrainSection defaults unless overridden), encode the delta with the miner's codec
and error feedback, decode it; then the validator's own functions: evaluate each delta on the
domain's held-out rows (the score), weight it (merge_weight), and merge per expert (WeightedMean +
outer_step with momentum kept across rounds). No processes, no network, no signing: those change
nothing in the numbers. After each round it reports, per domain, the held-out loss of the parent,
of parent + that domain's delta alone, and of the published version.

  python scripts/replay_outer.py --rounds 10 --outer 0.7,0.9,nesterov --outer 1.0,0,plain
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from expertmesh.node.demo.heldout import domain_sources
from expertmesh.node.evaluate import row_losses
from expertmesh.node.jobs import data_rows
from expertmesh.node.miner.config import SelectSection, TrainSection
from expertmesh.node.moe import load_model
from expertmesh.node.paths import DEFAULT_MODEL
from expertmesh.node.profile import RoutingProfile, batches
from expertmesh.node.select import select_experts
from expertmesh.node.train import SelectiveExperts, Trainer
from expertmesh.protocol.codec import CodecConfig, DeltaMeta, decode_delta, encode_delta
from expertmesh.protocol.heldout import DEFAULT_FRACTION, split
from expertmesh.validator.config import MergeSection
from expertmesh.validator.merge import WeightedMean, interference_scales, merge_weight, outer_step
from expertmesh.validator.scoring import applied


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def parse_outer(text: str) -> MergeSection:
    """outer_lr,momentum,nesterov|plain[,guard|noguard]: guard = the validator's regression guard (its default)."""
    lr, mu, kind, *rest = text.split(",")
    tries = MergeSection().regression_tries if not rest or rest[0] == "guard" else 0
    return MergeSection(outer_lr=float(lr), momentum=float(mu), nesterov=kind == "nesterov", regression_tries=tries)


def replay(moe, rows: dict, held: dict, rounds: int, merge: MergeSection, train: TrainSection,
           select: SelectSection, codec: CodecConfig, combine: str = "mean", eval_batch: int = 16,
           ) -> list[dict]:
    base_state = {k: v.clone() for k, v in moe.model.state_dict().items()}
    momentum: dict[str, torch.Tensor] = {}
    residual: dict[str, dict] = {d: {} for d in rows}
    losses = lambda: {d: float(row_losses(moe.model, h, eval_batch).mean()) for d, h in held.items()}  # noqa: E731
    parent = losses()
    out = [{"round": 0, "published": parent}]
    for r in range(1, rounds + 1):
        t0 = time.perf_counter()
        deltas, alone, selected = {}, {}, {}
        for d, rows_NL in rows.items():
            n = max(1, min(rows_NL.shape[0], select.profile_tokens // rows_NL.shape[1]))
            profile = RoutingProfile(moe).run(batches(rows_NL[:n], 16)).to_json()
            chosen = select_experts(profile, select.score, select.p, select.min_per_layer, select.max_per_layer or None)
            sel = SelectiveExperts(moe, chosen)
            torch.manual_seed(train.seed + r)
            try:
                Trainer(sel, rows_NL, train.model_copy(update={"seed": train.seed + r})).train()
                raw = sel.delta()
            finally:
                sel.detach()
            enc = encode_delta(raw, DeltaMeta(r - 1, train.steps * train.batch_size * rows_NL.shape[1], "0" * 64), codec,
                               residual[d])
            residual[d] = enc.residual
            deltas[d] = decode_delta(enc.payload, moe.expert_shapes()).tensors
            with applied(moe, deltas[d]):
                alone[d] = losses()
            selected[d] = chosen
        scores = {d: max(0.0, parent[d] - alone[d][d]) for d in rows}
        accepted = [(d, deltas[d], merge_weight(scores[d]))
                    for d in rows if scores[d] > 0]  # arrival order: domains in a fixed order

        def combined(scales: list[float]) -> dict[str, torch.Tensor]:
            if combine == "mean":
                mean = WeightedMean()
                for (_, delta, w), s in zip(accepted, scales):
                    mean.add({k: v * s for k, v in delta.items()}, w)
                return mean.result()
            out = {}  # one miner per domain here: the sum over domains of each domain's delta
            for (_, delta, _), s in zip(accepted, scales):
                for k, v in delta.items():
                    out[k] = out[k] + v * s if k in out else v * s
            return out

        def step(scales: list[float]) -> tuple[dict, dict]:
            mean_delta = combined(scales)
            base = {k: moe.weight(k).detach().clone() for k in mean_delta}
            return outer_step(base, mean_delta, {k: momentum[k] for k in mean_delta if k in momentum}, merge)

        def merged_losses(scales: list[float]) -> dict[str, float]:
            new_w, _ = step(scales)
            base = {k: moe.weight(k).detach() for k in new_w}
            with applied(moe, {k: w - base[k] for k, w in new_w.items()}):
                return losses()

        scales = [1.0] * len(accepted)
        if merge.regression_tries and accepted:
            scales, _ = interference_scales(parent, [alone[d] for d, _, _ in accepted], [d for d, _, _ in accepted],
                                            merged_losses, merge.max_regression, merge.regression_tries)
        if accepted:
            new_w, new_m = step(scales)
            with torch.no_grad():
                for k, w in new_w.items():
                    moe.weight(k).copy_(w)
            momentum.update(new_m)
        published = losses()
        names = sorted(rows)
        overlap = {f"{a}&{b}": len(selected[a] & selected[b]) for i, a in enumerate(names) for b in names[i + 1:]}
        entry = {"round": r, "parent": parent, "alone": {d: alone[d][d] for d in rows}, "published": published,
                 "scores": scores, "scales": dict(zip([d for d, _, _ in accepted], scales)),
                 "cross": {d: alone[d] for d in rows}, "experts": {d: len(s) for d, s in selected.items()}, "overlap": overlap,
                 "seconds": round(time.perf_counter() - t0, 1)}
        out.append(entry)
        log(f"round {r}: " + "  ".join(f"{d} {parent[d]:.4f}->{published[d]:.4f} (alone {alone[d][d]:.4f})"
                                      for d in names) + f"  scales {[round(x, 3) for x in scales]}  [{entry['seconds']} s]")
        parent = published
    moe.model.load_state_dict(base_state)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--outer", action="append", type=parse_outer,
                    help="outer_lr,momentum,nesterov|plain[,guard|noguard] (repeatable; default: the validator's defaults; "
                         "guard: halve deltas that make another domain worse than its parent, validator.merge."
                         "interference_scales)")
    ap.add_argument("--domains", default="math,literature,code")
    ap.add_argument("--combine", choices=("mean", "sum"), default="mean",
                    help="across domains on a shared expert: the weighted mean (the validator's today) or the sum")
    ap.add_argument("--steps", type=int, default=None, help="inner steps (default: the miner's)")
    ap.add_argument("--lr", type=float, default=None, help="inner lr (default: the miner's)")
    ap.add_argument("--p", type=float, default=None, help="ESFT p (default: the miner's)")
    ap.add_argument("--eval-tokens", type=int, default=16_384)
    ap.add_argument("--train-tokens", type=int, default=400_000, help="training tokens per domain")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    moe, tokenizer = load_model(DEFAULT_MODEL)
    train = TrainSection(**{k: v for k, v in {"steps": args.steps, "lr": args.lr}.items() if v is not None})
    select = SelectSection(**({"p": args.p} if args.p is not None else {}))
    with tempfile.TemporaryDirectory() as tmp:
        sources = domain_sources(Path(tmp))
        rows, held = {}, {}
        for d in args.domains.split(","):
            tr, ho = split(sources[d].texts(), DEFAULT_FRACTION)
            rows[d] = data_rows(tokenizer, tr, args.train_tokens, train.seq_len)
            held[d] = data_rows(tokenizer, ho, args.eval_tokens)
    results = []
    for merge in args.outer or [MergeSection()]:
        log(f"outer lr {merge.outer_lr}, momentum {merge.momentum}, nesterov {merge.nesterov}, {args.combine}, "
            f"regression guard {'on' if merge.regression_tries else 'off'}; inner {train.steps} steps "
            f"lr {train.lr}, p {select.p}")
        rounds = replay(moe, rows, held, args.rounds, merge, train, select, CodecConfig(), args.combine)
        results.append({"merge": merge.model_dump(), "combine": args.combine, "train": train.model_dump(), "p": select.p, "rounds": rounds})
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
