"""The `expertmesh` command line. Each command parses flags, calls one library function, prints.

Heavy imports (torch, transformers, grpc, hivemind) happen inside commands so `--help` is fast.
User mistakes raise ValueError/OSError; `main` turns them into one line on stderr and exit code 2.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Optional

import typer

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="expertmesh: fine-tune MoE models domain by domain over a peer-to-peer mesh.")


class UsageError(ValueError):
    """A user mistake caught by the CLI itself."""


def main() -> None:
    # click (vendored by typer) handles its own usage errors (exit 2) and exits; what escapes it
    # from a command is ours: user mistakes become one line and exit code 2.
    try:
        app()
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)


ModelOpt = typer.Option(None, "--model", help="local HF MoE checkpoint (default: the shipped tiny model)")
DataOpt = typer.Option(..., "--data", help="dataset file: .jsonl .jsonl.gz .json .csv .parquet .txt or a save_to_disk directory")
FieldOpt = typer.Option(None, "--text-field", help="record field holding the text (default: 'text')")
TemplateOpt = typer.Option(None, "--template", help='render records with a template, e.g. "{question}\\n{answer}"')


@app.command()
def profile(
    data: Path = DataOpt,
    out: Path = typer.Option(..., "--out", help="where to write profile.json"),
    model: Optional[Path] = ModelOpt,
    text_field: Optional[str] = FieldOpt,
    template: Optional[str] = TemplateOpt,
    tokens: int = typer.Option(100_000, "--tokens", help="tokens to profile"),
    plot: Optional[Path] = typer.Option(None, "--plot", help="also write a layers × experts heatmap PNG"),
) -> None:
    """Profile routing: per layer and expert, tokens routed and gate mass."""
    from node.jobs import run_profile

    doc = run_profile(data, out, model, text_field, template, tokens, plot=plot)
    print(f"profiled {doc['tokens']:,} tokens over {len(doc['layers'])} MoE layers (top-{doc['top_k']}) -> {out}")


@app.command()
def select(
    profile: Path = typer.Option(..., "--profile", help="profile.json from `expertmesh profile`"),
    out: Path = typer.Option(..., "--out", help="where to write experts.json (ESFT format)"),
    score: str = typer.Option("token", "--score", help="token (selection share) or gate (gate mass)"),
    p: float = typer.Option(0.2, "--p", help="cumulative score to reach per layer, in (0, 1]"),
    min_per_layer: int = typer.Option(1, "--min-per-layer"),
    max_per_layer: Optional[int] = typer.Option(None, "--max-per-layer"),
) -> None:
    """Select each layer's most-activated experts (ESFT rule)."""
    from node.jobs import run_select

    doc = run_select(profile, out, score, p, min_per_layer, max_per_layer)
    per_layer = {l: len(ids) for l, ids in doc["experts"].items()}
    print(f"selected {sum(per_layer.values())} experts (per layer {per_layer}) -> {out}")


@app.command()
def train(
    data: Path = DataOpt,
    experts: Path = typer.Option(..., "--experts", help="experts.json from `expertmesh select`"),
    steps: int = typer.Option(..., "--steps", help="optimizer steps"),
    out: Path = typer.Option(..., "--out", help="output directory: delta.safetensors + summary.json"),
    model: Optional[Path] = ModelOpt,
    text_field: Optional[str] = FieldOpt,
    template: Optional[str] = TemplateOpt,
    lr: float = typer.Option(1e-3, "--lr"),
    batch_size: int = typer.Option(8, "--batch-size", help="rows of 256 tokens per step"),
    seed: int = typer.Option(0, "--seed"),
    checkpoint_every: int = typer.Option(0, "--checkpoint-every", help="save resumable inner state to OUT/state every N steps"),
) -> None:
    """Train only the selected experts; write their delta and a summary with held-out loss."""
    from node.jobs import run_train

    s = run_train(data, experts, steps, out, model, text_field, template, lr, batch_size, seed,
                  checkpoint_every=checkpoint_every)
    fmt = lambda x: "n/a" if x is None else f"{x:.4f}"  # noqa: E731
    print(f"trained {s['selected_experts']} experts ({s['trainable_parameters']:,} parameters) for {steps} steps; "
          f"held-out loss {fmt(s['heldout_loss_before'])} -> {fmt(s['heldout_loss_after'])}; wrote {out}/delta.safetensors")
