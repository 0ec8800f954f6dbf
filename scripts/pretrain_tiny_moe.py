"""Pretrain the shipped default model: a tiny Qwen3-MoE with fine-grained experts on three real domains.

  python scripts/pretrain_tiny_moe.py [--out node/assets/tiny-moe] [--steps 2200]

Domains: literature (Tiny Shakespeare), math (GSM8K train, question + answer), both shipped in
node/assets/data (EXPERTMESH_DATA points elsewhere), and code (the Python standard library's sources). A fixed 5% of each domain,
chosen by content hash (protocol.heldout), is held out and never trained on. Writes a
transformers checkpoint (bf16 safetensors, to stay small), the tokenizer, pretrain.json and a README.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")

from expertmesh.node.data import pack, tokenize  # noqa: E402
from expertmesh.protocol.heldout import DEFAULT_FRACTION, split  # noqa: E402
from expertmesh.node.domains import DOMAINS, domain_texts  # noqa: E402
from expertmesh.node.evaluate import mean_loss  # noqa: E402
from expertmesh.node.paths import DEFAULT_MODEL  # noqa: E402

EOS = "<|endoftext|>"


def train_tokenizer(texts: list[str], vocab: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=[EOS], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=EOS, bos_token=EOS, unk_token=EOS)


def build_model(vocab: int, seed: int):
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(seed)
    config = Qwen3MoeConfig(
        vocab_size=vocab, hidden_size=128, intermediate_size=512, moe_intermediate_size=64,
        num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
        num_experts=64, num_experts_per_tok=4, norm_topk_prob=True, router_aux_loss_coef=0.01,
        max_position_embeddings=1024, tie_word_embeddings=False, eos_token_id=0, bos_token_id=0, pad_token_id=0,
    )
    model = Qwen3MoeForCausalLM(config)
    model.config._experts_implementation = "grouped_mm"  # fastest path on CPU; not saved as a default
    return model


def lr_at(step: int, progress: float, peak: float, warmup: int) -> float:
    """Linear warm-up, then cosine to 10% of peak over `progress` in [0, 1]."""
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=DEFAULT_MODEL)
    ap.add_argument("--steps", type=int, default=2200)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--mix", default="math=0.4,literature=0.2,code=0.4", help="sampling weights of the domains")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-minutes", type=float, default=24.0,
                    help="wall-clock budget for the whole run; on a slow or busy machine the schedule anneals by time "
                         "and stops early (and says so)")
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 2)
    t0 = time.time()
    mix = {k: float(v) for k, v in (kv.split("=") for kv in args.mix.split(","))}

    splits = {d: split(domain_texts(d), DEFAULT_FRACTION) for d in DOMAINS}
    for d, (tr, ho) in splits.items():
        print(f"{d}: {len(tr)} train / {len(ho)} held-out records", flush=True)
    tokenizer = train_tokenizer([t for tr, _ in splits.values() for t in tr], args.vocab)
    eos = tokenizer.convert_tokens_to_ids(EOS)
    rows = {d: pack(tokenize(tokenizer, tr), args.seq_len, eos) for d, (tr, _) in splits.items()}
    held = {d: pack(tokenize(tokenizer, ho), args.seq_len, eos)[:48] for d, (_, ho) in splits.items()}
    for d in DOMAINS:
        print(f"{d}: {rows[d].numel():,} train tokens, {held[d].numel():,} held-out eval tokens", flush=True)
    print(f"data ready in {time.time() - t0:.0f}s", flush=True)

    model = build_model(len(tokenizer), args.seed)
    params = sum(p.numel() for p in model.parameters())
    print(f"model: {params / 1e6:.2f}M parameters", flush=True)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    gen = torch.Generator().manual_seed(args.seed)
    weights = torch.tensor([mix[d] for d in DOMAINS])
    log, tokens, t_train, done = [], 0, time.time(), 0
    deadline = t0 + args.max_minutes * 60 - 90  # keep time to save, reload and evaluate
    model.train()
    for step in range(args.steps):
        # progress is by steps or by time, whichever is further, so a time-bound run still anneals fully
        progress = max(step / args.steps, (time.time() - t_train) / max(1.0, deadline - t_train))
        if progress >= 1.0:
            print(f"stopping at step {step} of {args.steps}: the --max-minutes {args.max_minutes} budget is spent", flush=True)
            break
        doms = torch.multinomial(weights, args.batch, replacement=True, generator=gen)
        batch = torch.stack([rows[DOMAINS[i]][torch.randint(0, rows[DOMAINS[i]].shape[0], (1,), generator=gen)[0]] for i in doms])
        for g in opt.param_groups:
            g["lr"] = lr_at(step, progress, args.lr, 100)
        out = model(input_ids=batch, labels=batch, output_router_logits=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        tokens += batch.numel()
        done = step + 1
        if step % 50 == 0 or step == args.steps - 1:
            el = time.time() - t_train
            print(f"step {step:5d}  loss {out.loss.item():.3f}  {tokens / el:,.0f} tok/s  {el / 60:.1f} min", flush=True)
        if step % 500 == 499:
            losses = {d: round(mean_loss(model, held[d]), 4) for d in DOMAINS}
            log.append({"step": step + 1, "heldout": losses})
            print(f"  held-out {losses}", flush=True)
    train_min = (time.time() - t_train) / 60

    args.out.mkdir(parents=True, exist_ok=True)
    model.config._experts_implementation = None
    model.to(torch.bfloat16).save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(args.out, dtype=torch.float32)
    final = {d: round(mean_loss(reloaded, held[d]), 4) for d in DOMAINS}
    total_min = (time.time() - t0) / 60
    stats = {"parameters": params, "steps": done, "tokens": tokens, "train_minutes": round(train_min, 1),
             "total_minutes": round(total_min, 1), "threads": torch.get_num_threads(), "mix": mix,
             "heldout_eval_tokens": {d: held[d].numel() for d in DOMAINS}, "heldout_loss": final, "log": log,
             "args": {k: str(v) for k, v in vars(args).items()}}
    (args.out / "pretrain.json").write_text(json.dumps(stats, indent=1) + "\n")
    table = "\n".join(f"| {d} | {final[d]:.3f} | {math.exp(final[d]):.1f} |" for d in DOMAINS)
    (args.out / "README.md").write_text(f"""# tiny-moe: the shipped default model

A Qwen3-MoE-architecture model built and pretrained by `scripts/pretrain_tiny_moe.py` (seed {args.seed}).

- {params / 1e6:.2f}M parameters: 4 layers, hidden 128, 64 fine-grained experts per layer (moe_intermediate_size 64), top-4, router aux loss 0.01; byte-level BPE tokenizer with {len(tokenizer)} tokens.
- Pretrained on literature (Tiny Shakespeare), math (GSM8K train, question + answer) and code (Python {'.'.join(map(str, __import__('sys').version_info[:2]))} standard library sources), sampled {args.mix}; a fixed 5% of each domain, chosen by content hash, is held out and never trained on.
- {done} steps × {args.batch} × {args.seq_len} tokens = {tokens / 1e6:.1f}M tokens in {train_min:.1f} min of training ({total_min:.1f} min in all, with data preparation and tokenizer training) on {torch.get_num_threads()} CPU threads.
- Stored in bf16 to stay small; load it in fp32 for training.

Held-out loss (nats per token, on {held['math'].numel():,} tokens of each domain's held-out split, after bf16 storage):

| domain | loss | perplexity |
|---|---|---|
{table}
""")
    print(json.dumps({"heldout_loss": final, "total_minutes": round(total_min, 1)}), flush=True)


if __name__ == "__main__":
    main()
