"""The runtime's jobs as the CLI runs them: files in, files out, around the tensor code.

profile: data file -> profile.json (+ heatmap); select: profile.json -> experts.json;
train: data file + experts.json -> delta.safetensors + summary.json.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import sys
import time
from pathlib import Path

import torch

from expertmesh.node.data import iter_texts, pack, tokenize
from expertmesh.node.evaluate import mean_loss
from expertmesh.protocol.codec import CodecConfig, DeltaMeta, encode_delta
from expertmesh.protocol.files import atomic_write, file_sha256
from expertmesh.node.moe import MoEModel, load_model, read_config
from expertmesh.node.paths import DEFAULT_MODEL
from expertmesh.node.profile import RoutingProfile, batches
from expertmesh.node.defaults import DEFAULT_LR, DEFAULT_P
from expertmesh.node.select import read_esft, select_experts
from expertmesh.node.train import SelectiveExperts, TrainConfig, train_resumable
from expertmesh.node.tomlconfig import validate
from expertmesh.protocol.heldout import DEFAULT_FRACTION, eval_chunk, eval_order, split

SEQ_LEN = 256


def _eos(tokenizer) -> int:
    return tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0


def data_rows(tokenizer, texts, max_tokens: int | None = None, seq_len: int = SEQ_LEN) -> torch.Tensor:
    return pack(tokenize(tokenizer, texts), seq_len, _eos(tokenizer), max_tokens)


HELDOUT_RECORD_TOKENS = 512  # at most this much of one held-out record enters a validator's evaluation rows


def heldout_rows(tokenizer, texts, key: bytes | None, max_tokens: int, seq_len: int = SEQ_LEN,
                 record_tokens: int = HELDOUT_RECORD_TOKENS) -> torch.Tensor:
    """A validator's evaluation rows: held-out texts in its keyed order (protocol.heldout.eval_order); of
    each, one piece of `record_tokens` tokens, chosen by the key (eval_chunk), so that the rows span many
    records and every part of a long one (a source file) can be scored; packed into rows of seq_len, cut
    at max_tokens."""
    ordered = eval_order(texts, key)

    def pieces():
        for text, ids in zip(ordered, tokenize(tokenizer, ordered)):
            k = eval_chunk(text, key, -(-len(ids) // record_tokens))
            yield ids[k * record_tokens:(k + 1) * record_tokens]

    return pack(pieces(), seq_len, _eos(tokenizer), max_tokens)


def file_digest(path: Path) -> str:
    """sha256 of a dataset file, or of a save_to_disk directory's files in name order."""
    if not path.is_dir():
        return file_sha256(path)
    h = hashlib.sha256()
    for f in sorted(path.rglob("*")):
        if f.is_file():
            h.update(bytes.fromhex(file_sha256(f)))
    return h.hexdigest()


def _load(model_dir: Path | None) -> tuple[MoEModel, object]:
    return load_model(model_dir or DEFAULT_MODEL)


def run_profile(data: Path, out: Path, model_dir: Path | None = None, text_field: str | None = None,
                template: str | None = None, tokens: int = 100_000, batch_size: int = 16, plot: Path | None = None) -> dict:
    if tokens < SEQ_LEN:
        raise ValueError(f"--tokens must be at least {SEQ_LEN}")
    read_config(model_dir or DEFAULT_MODEL)  # a bad --model is reported before the data is read
    texts = iter_texts(data, text_field, template)
    first = next(texts)  # surfaces an empty or malformed file before the model loads
    moe, tokenizer = _load(model_dir)
    rows = data_rows(tokenizer, _chain(first, texts), tokens)
    if rows.shape[0] == 0:
        raise ValueError(f"{data}: fewer than {SEQ_LEN} tokens of text; profiling needs more data")
    prof = RoutingProfile(moe).run(batches(rows, batch_size))
    doc = prof.to_json() | {"data": str(data)}
    _write_json(out, doc)
    if plot is not None:
        from expertmesh.node.plots import routing_heatmap

        routing_heatmap(doc, plot)
    return doc


def _chain(first, rest):
    yield first
    yield from rest


def run_select(profile: Path, out: Path, score: str = "token", p: float = DEFAULT_P, min_per_layer: int = 1,
               max_per_layer: int | None = None) -> dict:
    chosen = select_experts(_read_json(profile), score, p, min_per_layer, max_per_layer)
    doc = chosen.to_esft()
    _write_json(out, doc)
    return doc


def run_train(data: Path, experts: Path, steps: int, out: Path, model_dir: Path | None = None,
              text_field: str | None = None, template: str | None = None, lr: float = DEFAULT_LR, batch_size: int = 8,
              seed: int = 0, eval_tokens: int = 16_384, checkpoint_every: int = 0, log_every: int = 10) -> dict:
    cfg = validate(TrainConfig, {"steps": steps, "lr": lr, "batch_size": batch_size, "seed": seed}, None, "", flags=True)
    train_texts, held_texts = split(iter_texts(data, text_field, template), DEFAULT_FRACTION)
    moe, tokenizer = _load(model_dir)
    selection = read_esft(_read_json(experts), moe)
    rows = data_rows(tokenizer, train_texts)
    held = data_rows(tokenizer, held_texts, eval_tokens) if held_texts else torch.empty(0, SEQ_LEN, dtype=torch.long)
    torch.manual_seed(seed)
    sel = SelectiveExperts(moe, selection)
    state_dir = out / "state"
    before = mean_loss(moe.model, held) if held.numel() else None
    t0 = time.time()

    def report(step: int, loss: float, rate: float) -> None:
        if step % log_every == 0 or step == cfg.steps:
            print(f"step {step}/{cfg.steps}  loss {loss:.4f}  {rate:,.0f} tok/s", file=sys.stderr, flush=True)

    out.mkdir(parents=True, exist_ok=True)
    trainer, resumed_from = train_resumable(sel, rows, cfg, state_dir, checkpoint_every, report,
                                            lambda line: print(line, file=sys.stderr), extra={"data": str(data)})
    seconds = time.time() - t0
    after = mean_loss(moe.model, held) if held.numel() else None
    # The wire format (fp32, version 0: a local run), so `expertmesh delta inspect` reads it.
    tokens = (cfg.steps - resumed_from) * cfg.batch_size * SEQ_LEN
    encoded = encode_delta(sel.delta(), DeltaMeta(0, tokens, file_digest(data)), CodecConfig("fp32"))
    atomic_write(out / "delta.safetensors", encoded.payload)
    expert_params = sum(l.experts.gate_up_proj.numel() + l.experts.down_proj.numel() for l in moe.layers)
    summary = {
        "model": moe.source, "data": str(data), "data_sha256": file_digest(data), "experts_file": str(experts),
        "selected_experts": len(selection), "trainable_parameters": sel.num_parameters(),
        "trainable_fraction_of_expert_parameters": round(sel.num_parameters() / expert_params, 4),
        "optimizer_state_bytes": trainer.optimizer_state_bytes(), "config": cfg.model_dump(), "resumed_from_step": resumed_from,
        "train_rows": int(rows.shape[0]), "heldout_eval_tokens": int(held.numel()),
        "tokens": tokens, "seconds": round(seconds, 2),
        "heldout_loss_before": before, "heldout_loss_after": after, "train_loss": trainer.losses,
    }
    _write_json(out / "summary.json", summary)
    shutil.rmtree(state_dir, ignore_errors=True)  # finished: the inner state is no longer needed
    return summary


def _read_json(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None


def _write_json(path: Path, doc: dict) -> None:
    atomic_write(path, json.dumps(doc, indent=1) + "\n")
