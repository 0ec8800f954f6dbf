"""What a round trains: token rows of the domain data and the ESFT expert selection for this model version.

Both are cached on disk: rows per (data digest, tokenizer, limits), and the routing profile plus the
selection per (model version, data digest, selection settings), so a restarted miner, or the next
round on the same version, skips the work. Cache files are our own (safetensors and JSON).
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from expertmesh.node.data import pack, tokenize
from expertmesh.protocol.files import atomic_write, file_sha256
from expertmesh.node.miner.config import MinerConfig
from expertmesh.node.miner.data import DomainData
from expertmesh.node.miner.progress import Progress
from expertmesh.node.moe import MoEModel
from expertmesh.node.profile import RoutingProfile
from expertmesh.node.select import read_esft, select_experts
from expertmesh.protocol.experts import ExpertSet


@dataclass(frozen=True)
class Plan:
    rows_NL: torch.Tensor
    selection: ExpertSet
    key: str  # names this (version, data, settings) combination


def _key(*parts: object) -> str:
    return hashlib.sha256("|".join(map(str, parts)).encode()).hexdigest()[:20]


def token_rows(tokenizer, model_dir: Path, data: DomainData, cfg: MinerConfig, cache: Path) -> torch.Tensor:
    tok_id = file_sha256(model_dir / "tokenizer.json") if (model_dir / "tokenizer.json").is_file() else model_dir.name
    path = cache / f"rows-{_key(data.digest, tok_id, cfg.data.max_tokens, cfg.train.seq_len)}.safetensors"
    if path.is_file():
        return load_file(path)["rows"]
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    rows_NL = pack(tokenize(tokenizer, data.train_texts()), cfg.train.seq_len, eos, cfg.data.max_tokens)
    if rows_NL.shape[0] == 0:
        raise ValueError(f"{data.source}: fewer than {cfg.train.seq_len} tokens outside the held-out split; "
                         "a miner needs more data")
    atomic_write(path, lambda tmp: save_file({"rows": rows_NL.contiguous()}, tmp))
    return rows_NL


def select_for(moe: MoEModel, rows_NL: torch.Tensor, version_tag: str, data: DomainData, cfg: MinerConfig,
               cache: Path, progress: Progress) -> tuple[ExpertSet, str]:
    s = cfg.select
    key = _key(version_tag, data.digest, s.p, s.score, s.min_per_layer, s.max_per_layer, s.profile_tokens,
               cfg.train.seq_len)
    path = cache / f"selection-{key}.json"
    if path.is_file():
        return read_esft(json.loads(path.read_text())["experts"], moe), key
    n_rows = max(1, min(rows_NL.shape[0], s.profile_tokens // rows_NL.shape[1]))
    batch = 16
    device = next(moe.model.parameters()).device

    def batches():
        for i in range(0, n_rows, batch):
            progress.steps("profile rows", min(i + batch, n_rows), n_rows)
            yield rows_NL[i : i + batch].to(device)

    profile = RoutingProfile(moe).run(batches()).to_json()
    chosen = select_experts(profile, s.score, s.p, s.min_per_layer, s.max_per_layer or None)
    atomic_write(path, json.dumps({"version": version_tag, "data": data.digest, "profile": profile,
                                   "experts": chosen.to_esft()}))
    return chosen, key


def make_plan(moe: MoEModel, tokenizer, model_dir: Path, data: DomainData, cfg: MinerConfig, cache: Path,
              progress: Progress) -> Plan:
    rows_NL = token_rows(tokenizer, model_dir, data, cfg, cache)
    selection, key = select_for(moe, rows_NL, model_dir.name, data, cfg, cache, progress)
    return Plan(rows_NL, selection, key)
