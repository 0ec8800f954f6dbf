"""The `expertmesh` command line. Each command parses flags, calls one library function, prints.

Heavy imports (torch, transformers, grpc, hivemind) happen inside commands so `--help` is fast.
User mistakes raise ValueError/OSError; `main` turns them into one line on stderr and exit code 2.
"""
from __future__ import annotations

import os
import sys
from contextlib import nullcontext
from pathlib import Path
from typing import Optional

import typer

from expertmesh.node.defaults import DEFAULT_LR, DEFAULT_P

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
    from expertmesh.node.jobs import run_profile

    doc = run_profile(data, out, model, text_field, template, tokens, plot=plot)
    print(f"profiled {doc['tokens']:,} tokens over {len(doc['layers'])} MoE layers (top-{doc['top_k']}) -> {out}")


@app.command()
def select(
    profile: Path = typer.Option(..., "--profile", help="profile.json from `expertmesh profile`"),
    out: Path = typer.Option(..., "--out", help="where to write experts.json (ESFT format)"),
    score: str = typer.Option("token", "--score", help="token (selection share) or gate (gate mass)"),
    p: float = typer.Option(DEFAULT_P, "--p", help="cumulative score to reach per layer, in (0, 1]"),
    min_per_layer: int = typer.Option(1, "--min-per-layer"),
    max_per_layer: Optional[int] = typer.Option(None, "--max-per-layer"),
) -> None:
    """Select each layer's most-activated experts (ESFT rule)."""
    from expertmesh.node.jobs import run_select

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
    lr: float = typer.Option(DEFAULT_LR, "--lr", help="AdamW learning rate (default: the ESFT frontier in docs/BENCHMARKS.md)"),
    batch_size: int = typer.Option(8, "--batch-size", help="rows of 256 tokens per step"),
    seed: int = typer.Option(0, "--seed"),
    checkpoint_every: int = typer.Option(0, "--checkpoint-every", help="save resumable inner state to OUT/state every N steps"),
) -> None:
    """Train only the selected experts; write their delta and a summary with held-out loss."""
    from expertmesh.node.jobs import run_train
    from expertmesh.node.locks import hold_state_dir

    with hold_state_dir(out, "expertmesh train"):  # OUT/state holds the resumable inner state
        s = run_train(data, experts, steps, out, model, text_field, template, lr, batch_size, seed,
                      checkpoint_every=checkpoint_every)
    fmt = lambda x: "n/a" if x is None else f"{x:.4f}"  # noqa: E731
    print(f"trained {s['selected_experts']} experts ({s['trainable_parameters']:,} parameters) for {steps} steps; "
          f"held-out loss {fmt(s['heldout_loss_before'])} -> {fmt(s['heldout_loss_after'])}; wrote {out}/delta.safetensors")


# --- identity, deltas, discovery (protocol) ---------------------------------------------------------
delta_app = typer.Typer(add_completion=False, no_args_is_help=True, help="Inspect expert-delta files.")
app.add_typer(delta_app, name="delta")


@app.command()
def keygen(
    out: Path = typer.Option(..., "--out", help="where to write the private key (mode 0600)"),
    force: bool = typer.Option(False, "--force", help="replace an existing key file"),
) -> None:
    """Create an Ed25519 identity and print its key id (the hex public key)."""
    from expertmesh.protocol import identity

    from expertmesh.node.locks import refuse_if_held

    key = identity.generate_key()
    with refuse_if_held(out.parent, "expertmesh keygen") or nullcontext():  # a running node's key stays its own
        identity.save_key(key, out, overwrite=force)
    print(identity.key_id(identity.public_bytes(key)))


@delta_app.command("inspect")
def delta_inspect(
    file: Path = typer.Argument(..., help="a delta file (safetensors) written by protocol.codec"),
    max_bytes: int = typer.Option(4 << 30, "--max-bytes", help="refuse larger files"),
) -> None:
    """Print a delta's experts, size, codec and compression ratio versus fp16 and fp32."""
    from expertmesh.protocol.codec import read_delta_header

    if file.stat().st_size > max_bytes:
        raise UsageError(f"{file} is {file.stat().st_size} bytes, over --max-bytes {max_bytes}")
    size = file.stat().st_size
    h = read_delta_header(file.read_bytes(), max_bytes)
    n_experts, layers = len(h.experts), h.experts.layers()
    params = n_experts * 3 * h.hidden * h.intermediate
    codec = h.codec + (f" (block {h.block})" if h.block else "") + (f", keep {h.keep} per block" if h.keep else "")
    print(f"file: {file}")
    print(f"codec: {codec}")
    print(f"model_version: {h.model_version}")
    print(f"token_count: {h.token_count}")
    print(f"data_digest: {h.data_digest}")
    print(f"experts: {n_experts} in {len(layers)} layers (hidden {h.hidden}, intermediate {h.intermediate})")
    for layer, ids in layers.items():
        print(f"  layer {layer}: {' '.join(map(str, ids))}")
    print(f"bytes: {size}")
    print(f"ratio_vs_fp32: {params * 4 / size:.2f}x ({params * 4} bytes dense)")
    print(f"ratio_vs_fp16: {params * 2 / size:.2f}x ({params * 2} bytes dense)")


@app.command()
def bootstrap(
    listen: list[str] = typer.Option(["/ip4/127.0.0.1/tcp/0"], "--listen",
                                     help="multiaddr to listen on (repeatable); e.g. /ip4/0.0.0.0/tcp/31337"),
    announce: list[str] = typer.Option([], "--announce", help="public multiaddr to announce (explicit port)"),
    identity_file: Optional[Path] = typer.Option(None, "--identity",
                                                 help="an `expertmesh keygen` key: keeps the peer id stable"),
    initial_peer: list[str] = typer.Option([], "--initial-peer", help="another bootstrap peer to join"),
) -> None:
    """Run a DHT bootstrap peer (UPnP off), print its multiaddrs, serve until SIGTERM/SIGINT."""
    import signal
    import threading

    from expertmesh.protocol import identity
    from expertmesh.protocol.discovery import DiscoveryConfig, start_dht, visible_maddrs

    key = identity.load_key(identity_file) if identity_file is not None else None
    config = DiscoveryConfig(host_maddrs=tuple(listen), announce_maddrs=tuple(announce),
                             initial_peers=tuple(initial_peer))
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    dht = start_dht(config, key)
    try:
        for maddr in visible_maddrs(dht):
            print(maddr, flush=True)
        while not stop.wait(0.5):
            pass
    finally:
        dht.shutdown()


# --- validator -------------------------------------------------------------------------------------
validator_app = typer.Typer(add_completion=False, no_args_is_help=True, help="Run a validator.")
app.add_typer(validator_app, name="validator")


@validator_app.command("run")
def validator_run(
    config: Path = typer.Option(..., "--config", help="validator.toml (docs/validator.md has a complete example)"),
    host: Optional[str] = typer.Option(None, "--host", help="override server.host"),
    port: Optional[int] = typer.Option(None, "--port", help="override server.port (0: any free port)"),
    state_dir: Optional[Path] = typer.Option(None, "--state-dir", help="override state_dir"),
    model: Optional[Path] = typer.Option(None, "--model", help="override model (the base imported as version 0)"),
    metrics_port: Optional[int] = typer.Option(None, "--metrics-port", help="serve metrics on this port"),
) -> None:
    """Take submissions, score them on held-out data, merge and publish versions; stop with SIGTERM."""
    from expertmesh.validator.config import load_config
    from expertmesh.validator.daemon import run_daemon

    overrides = {"server.host": host, "server.port": port, "metrics.port": metrics_port,
                 "state_dir": state_dir.resolve() if state_dir else None, "model": model.resolve() if model else None,
                 "metrics.enabled": True if metrics_port is not None else None}
    raise typer.Exit(run_daemon(load_config(config, overrides)))


@app.command()
def status(
    validator: str = typer.Option(..., "--validator", help="the validator's HOST:PORT"),
    timeout: float = typer.Option(10.0, "--timeout", help="seconds to wait for each answer"),
) -> None:
    """Show a validator's round, model version and miner leaderboard."""
    from rich.console import Console

    from expertmesh.node.statusview import fetch_status, render

    render(fetch_status(validator, timeout), Console())


# --- miner, dataset submission, local network -----------------------------------------------------
miner_app = typer.Typer(add_completion=False, no_args_is_help=True, help="Run a miner.")
app.add_typer(miner_app, name="miner")
dataset_app = typer.Typer(add_completion=False, no_args_is_help=True, help="Register and list domain datasets.")
app.add_typer(dataset_app, name="dataset")


def _abs(path: Optional[Path]) -> Optional[Path]:
    return path.resolve() if path is not None else None  # flags are relative to the shell, not the config file


@miner_app.command("run")
def miner_run(
    config: Path = typer.Option(..., "--config", help="miner.toml (README.md: Run a miner)"),
    validator: Optional[str] = typer.Option(None, "--validator", help="override validator.address (HOST:PORT)"),
    initial_peer: list[str] = typer.Option([], "--initial-peer", help="override validator.initial_peers (repeatable)"),
    domain: Optional[str] = typer.Option(None, "--domain", help="override domain"),
    data: Optional[Path] = typer.Option(None, "--data", help="override data.path (a local dataset file)"),
    state_dir: Optional[Path] = typer.Option(None, "--state-dir", help="override state_dir"),
    key: Optional[Path] = typer.Option(None, "--key", help="override key"),
    steps: Optional[int] = typer.Option(None, "--steps", help="override train.steps (H)"),
    max_rounds: Optional[int] = typer.Option(None, "--max-rounds", help="override loop.max_rounds"),
    metrics_port: Optional[int] = typer.Option(None, "--metrics-port", help="serve /metrics on this port (0: any free port)"),
) -> None:
    """Train a domain's experts each round and submit the signed delta; stop with SIGTERM."""
    from expertmesh.node.miner.config import load_config

    overrides = {"validator.address": validator, "validator.initial_peers": initial_peer or None, "domain": domain,
                 "data.path": _abs(data), "state_dir": _abs(state_dir), "key": _abs(key), "train.steps": steps,
                 "loop.max_rounds": max_rounds, "metrics.port": metrics_port,
                 "metrics.enabled": True if metrics_port is not None else None}
    cfg = load_config(config, overrides)  # before the heavy imports: a bad config fails at once
    from expertmesh.node.miner.daemon import run_miner

    raise typer.Exit(run_miner(cfg))


@dataset_app.command("submit")
def dataset_submit(
    file: Path = typer.Argument(..., help="dataset: .jsonl .jsonl.gz .json .csv .parquet .txt or a save_to_disk directory"),
    domain: str = typer.Option(..., "--domain", help="domain name, e.g. math"),
    validator: str = typer.Option(..., "--validator", help="the validator's HOST:PORT"),
    key: Path = typer.Option(..., "--key", help="your key file (`expertmesh keygen`)"),
    text_field: Optional[str] = FieldOpt,
    template: Optional[str] = TemplateOpt,
    min_tokens: int = typer.Option(8192, "--min-tokens", help="refuse datasets with fewer tokens"),
    max_bytes: int = typer.Option(4 << 30, "--max-bytes", help="refuse datasets whose rendered text is larger"),
    max_record_bytes: int = typer.Option(1 << 20, "--max-record-bytes", help="refuse records larger than this"),
    cache_dir: Optional[Path] = typer.Option(None, "--cache-dir", help="tokenizer cache (default ~/.cache/expertmesh)"),
    dry_run: bool = typer.Option(False, "--dry-run", help="check and show the dataset, send nothing"),
) -> None:
    """Check a dataset, show a preview and its token count, and register it with a validator."""
    from expertmesh.node.submission.commands import submit
    from expertmesh.node.submission.prepare import SubmitLimits

    limits = SubmitLimits(max_bytes=max_bytes, max_record_bytes=max_record_bytes, min_tokens=min_tokens)
    submit(file, domain, validator, key, text_field, template, limits, cache_dir, dry_run)


@dataset_app.command("list")
def dataset_list(
    validator: str = typer.Option(..., "--validator", help="the validator's HOST:PORT"),
    domain: Optional[str] = typer.Option(None, "--domain", help="only this domain"),
    counts: bool = typer.Option(True, "--counts/--no-counts", help="fetch train parts to count records and tokens"),
    cache_dir: Optional[Path] = typer.Option(None, "--cache-dir", help="cache (default ~/.cache/expertmesh)"),
) -> None:
    """List a validator's registered datasets (train part: records and tokens)."""
    from expertmesh.node.submission.commands import list_datasets

    list_datasets(validator, domain, counts, cache_dir)


@app.command()
def demo(
    rounds: int = typer.Option(3, "--rounds", help="published rounds to run"),
    miners: int = typer.Option(3, "--miners", help="miners, on math, literature, code in turn"),
    json_path: Optional[Path] = typer.Option(None, "--json", help="also write the figures as JSON here"),
    run_dir: Optional[Path] = typer.Option(None, "--run-dir", help="where logs and state go (default runs/demo-<time>)"),
    steps: Optional[int] = typer.Option(None, "--steps", help="miner inner steps per round (default: the demo's)"),
    eval_tokens: int = typer.Option(16_384, "--eval-tokens", help="held-out tokens per domain in the table"),
    timeout: float = typer.Option(3600.0, "--timeout", help="give up (and stop everything) after this many seconds"),
) -> None:
    """Run a whole network on this machine: DHT bootstrap, validator, miners on three domains."""
    from expertmesh.node.demo.run import DemoOptions, run_demo

    raise typer.Exit(run_demo(DemoOptions(rounds=rounds, miners=miners, json_path=_abs(json_path),
                                          run_dir=_abs(run_dir), steps=steps, eval_tokens=eval_tokens,
                                          timeout_s=timeout)))
