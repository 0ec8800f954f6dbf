"""MoE architecture adapters: load a local HF checkpoint and find, per MoE layer, its router and experts.

transformers 5.x keeps experts fused in memory (gate_up_proj [E, 2I, H] as [gate; up], down_proj
[E, H, I]) and writes per-expert tensors on disk. An expert is addressed by (layer, expert); the
adapter maps that address to the in-memory slices, the canonical wire names and the on-disk names.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from expertmesh.protocol.experts import PROJS, expert_key, parse_expert_key, proj_shape

# model_type -> (on-disk per-expert prefix inside a decoder layer, on-disk names of gate/up/down)
ARCHITECTURES: dict[str, tuple[str, tuple[str, str, str]]] = {
    "qwen3_moe": ("mlp.experts", ("gate_proj", "up_proj", "down_proj")),
    "qwen2_moe": ("mlp.experts", ("gate_proj", "up_proj", "down_proj")),
    "olmoe": ("mlp.experts", ("gate_proj", "up_proj", "down_proj")),
    "mixtral": ("block_sparse_moe.experts", ("w1", "w3", "w2")),
    "deepseek_v3": ("mlp.experts", ("gate_proj", "up_proj", "down_proj")),
}
_MOE_CONFIG_KEYS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")


class ModelError(ValueError):
    """A model directory that this runtime cannot use."""


@dataclass(frozen=True)
class MoELayer:
    index: int  # decoder layer index (DeepSeek's dense first layers have none)
    router: nn.Module  # forward(x_TH) -> (logits_TE, topk_weights_TK, topk_idx_TK)
    experts: nn.Module  # fused gate_up_proj [E, 2I, H], down_proj [E, H, I]
    shared: nn.Module | None  # Qwen2-MoE / DeepSeek shared expert: always frozen here

    @property
    def num_experts(self) -> int:
        return self.experts.gate_up_proj.shape[0]

    @property
    def intermediate(self) -> int:
        return self.experts.down_proj.shape[2]

    @property
    def hidden(self) -> int:
        return self.experts.down_proj.shape[1]


@dataclass
class MoEModel:
    arch: str
    model: nn.Module
    layers: list[MoELayer]
    top_k: int
    source: str

    def layer(self, index: int) -> MoELayer:
        for lay in self.layers:
            if lay.index == index:
                return lay
        raise ModelError(f"layer {index} is not an MoE layer of this model (MoE layers: {[l.index for l in self.layers]})")

    def expert_weights(self, layer: int, expert: int) -> dict[str, torch.Tensor]:
        """Views of one expert's weights in the canonical per-expert layout, keyed by canonical name."""
        lay = self.layer(layer)
        if not 0 <= expert < lay.num_experts:
            raise ModelError(f"layer {layer} has experts 0..{lay.num_experts - 1}, not {expert}")
        I = lay.intermediate
        gu = lay.experts.gate_up_proj[expert]
        views = (gu[:I], gu[I:], lay.experts.down_proj[expert])
        return {expert_key(layer, expert, p): v for p, v in zip(PROJS, views)}

    def weight(self, key: str) -> torch.Tensor:
        """The view of one expert tensor named canonically (writes go to the model)."""
        layer, expert, _ = parse_expert_key(key)
        return self.expert_weights(layer, expert)[key]

    @torch.no_grad()
    def add_delta(self, delta: dict[str, torch.Tensor], alpha: float = 1.0) -> None:
        """θ += alpha·Δ for the experts a (validated, canonical-keyed) delta names; nothing else changes."""
        for key, d in delta.items():
            w = self.weight(key)
            w.add_(d.to(w.dtype), alpha=alpha)

    def disk_name(self, layer: int, expert: int, proj: str) -> str:
        prefix, names = ARCHITECTURES[self.arch]
        return f"model.layers.{layer}.{prefix}.{expert}.{names[PROJS.index(proj)]}.weight"

    def expert_shapes(self) -> dict[str, tuple[int, ...]]:
        """Canonical name -> shape for every expert tensor (what a delta may contain)."""
        out = {}
        for lay in self.layers:
            for e in range(lay.num_experts):
                for p in PROJS:
                    out[expert_key(lay.index, e, p)] = proj_shape(p, lay.hidden, lay.intermediate)
        return out


def find_moe_layers(model: nn.Module) -> list[MoELayer]:
    layers = []
    for i, block in enumerate(model.model.layers):
        mlp = getattr(block, "mlp", None) or getattr(block, "block_sparse_moe", None)
        experts, router = getattr(mlp, "experts", None), getattr(mlp, "gate", None)
        if experts is None or router is None or not hasattr(experts, "gate_up_proj"):
            continue  # a dense layer
        if getattr(experts, "is_transposed", False) or not getattr(experts, "is_concatenated", True) or getattr(experts, "has_bias", False):
            raise ModelError(f"layer {i}: expert layout (transposed/interleaved/biased) is not supported")
        shared = getattr(mlp, "shared_expert", None) or getattr(mlp, "shared_experts", None)
        layers.append(MoELayer(i, router, experts, shared))
    return layers


def read_config(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_dir():
        raise ModelError(f"model directory not found: {path}")
    cfg = path / "config.json"
    if not cfg.is_file():
        raise ModelError(f"{path} is not a transformers checkpoint (no config.json)")
    try:
        config = json.loads(cfg.read_text())
    except json.JSONDecodeError as exc:
        raise ModelError(f"{cfg}: not valid JSON ({exc.msg})") from None
    arch = config.get("model_type")
    if arch not in ARCHITECTURES:
        if not any(config.get(k) for k in _MOE_CONFIG_KEYS):
            raise ModelError(f"{path}: {arch or 'this model'} is not a Mixture-of-Experts model (no routed experts in its config)")
        raise ModelError(f"{path}: unsupported MoE architecture {arch!r}; supported: {', '.join(sorted(ARCHITECTURES))}")
    return config


def load_model(path: str | Path, dtype: torch.dtype = torch.float32) -> tuple[MoEModel, object]:
    """(adapter over the loaded model, tokenizer) for a local checkpoint; ModelError if unusable."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    config = read_config(path)
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError) as exc:
        raise ModelError(f"{path}: cannot load the checkpoint ({str(exc).splitlines()[0]})") from None
    return wrap(model, str(path), config["model_type"]), tokenizer


def wrap(model: nn.Module, source: str = "", arch: str | None = None) -> MoEModel:
    arch = arch or model.config.model_type
    if arch not in ARCHITECTURES:
        raise ModelError(f"unsupported MoE architecture {arch!r}; supported: {', '.join(sorted(ARCHITECTURES))}")
    layers = find_moe_layers(model)
    if not layers:
        raise ModelError(f"{source or arch}: no MoE layers found")
    return MoEModel(arch, model, layers, int(model.config.num_experts_per_tok), source)
