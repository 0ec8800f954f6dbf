"""Selective expert trainer (ESFT): only the selected experts get gradients and optimizer state.

The selected experts' weights are copied into compact trainable tensors (per layer gate_up [S, 2I, H]
and down [S, H, I]); the model's fused expert tensors stay frozen and untouched, and each experts
module's forward is routed through the kernel dispatcher, which reads an expert's weights from the
compact tensor when it is selected and from the frozen base otherwise. AdamW therefore holds moments
for the selected slices only. Tensors in, tensors out: checkpoint files are written by `save_state`.
"""
from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import torch
from pydantic import Field
from safetensors.torch import load_file, save_file
from torch import nn

from expertmesh.kernels import expert_ffn
from expertmesh.node.defaults import DEFAULT_LR
from expertmesh.node.tomlconfig import Section
from expertmesh.protocol.files import atomic_write, fsync_path
from expertmesh.node.moe import MoEModel
from expertmesh.protocol.experts import ExpertSet, expert_key


class TrainConfig(Section):
    """The inner loop's hyper-parameters: `expertmesh train`'s flags, and the base of the miner's [train]."""

    steps: int = Field(..., ge=0, le=1_000_000, description="H: AdamW steps")
    lr: float = Field(DEFAULT_LR, gt=0, lt=1)
    beta1: float = Field(0.9, ge=0, lt=1)
    beta2: float = Field(0.95, ge=0, lt=1)
    weight_decay: float = Field(0.1, ge=0, le=10)
    clip: float = Field(1.0, gt=0, le=1e6, description="gradient norm clip")
    batch_size: int = Field(8, ge=1, le=4096, description="rows per step")
    seed: int = Field(0, ge=0, description="batch order and initialisation")


class SelectiveExperts:
    """Compact trainable copies of the selected experts, patched into the model's expert forward."""

    def __init__(self, moe: MoEModel, selection: ExpertSet):
        self.moe = moe
        self.selection = selection
        self.by_layer = selection.layers()
        for p in moe.model.parameters():
            p.requires_grad_(False)
        self.ids: dict[int, torch.Tensor] = {}
        self.gate_up: dict[int, nn.Parameter] = {}
        self.down: dict[int, nn.Parameter] = {}
        for l, ids in self.by_layer.items():
            experts = moe.layer(l).experts
            idx = torch.tensor(ids, dtype=torch.long)
            self.ids[l] = idx
            self.gate_up[l] = nn.Parameter(experts.gate_up_proj.detach()[idx].clone())
            self.down[l] = nn.Parameter(experts.down_proj.detach()[idx].clone())
            experts.forward = self._forward(experts, l)

    def _forward(self, experts: nn.Module, l: int) -> Callable:
        def forward(hidden_states, top_k_index, top_k_weights):
            return expert_ffn(hidden_states, top_k_index, top_k_weights, experts.gate_up_proj, experts.down_proj,
                              self.ids[l], self.gate_up[l], self.down[l])
        return forward

    def parameters(self) -> list[nn.Parameter]:
        return [p for l in self.by_layer for p in (self.gate_up[l], self.down[l])]

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    @torch.no_grad()
    def delta(self) -> dict[str, torch.Tensor]:
        """trained − base for every selected expert, keyed by canonical name (fp32, contiguous)."""
        return self._canonical(lambda l, s, e, proj: proj(self.gate_up[l][s], self.down[l][s])
                               - proj(self.moe.layer(l).experts.gate_up_proj[e], self.moe.layer(l).experts.down_proj[e]))

    @torch.no_grad()
    def grads(self) -> dict[str, torch.Tensor]:
        """The trainable copies' .grad (zeros where none), keyed by canonical name (fp32, contiguous)."""
        def grad(p: nn.Parameter) -> torch.Tensor:
            return p.grad if p.grad is not None else torch.zeros_like(p)
        return self._canonical(lambda l, s, e, proj: proj(grad(self.gate_up[l])[s], grad(self.down[l])[s]))

    def _canonical(self, value: Callable) -> dict[str, torch.Tensor]:
        """{canonical key: value(layer, slot, expert, proj)}; proj(gate_up [2I, H], down [H, I]) picks one projection."""
        out = {}
        for l, ids in self.by_layer.items():
            I = self.moe.layer(l).intermediate
            picks = {"gate_proj": lambda gu, d: gu[:I], "up_proj": lambda gu, d: gu[I:], "down_proj": lambda gu, d: d}
            for s, e in enumerate(ids):
                for name, proj in picks.items():
                    out[expert_key(l, e, name)] = value(l, s, e, proj).float().contiguous()
        return out

    def detach(self) -> None:
        """Restore the model's own expert forward (the fused weights were never changed)."""
        for l in self.by_layer:
            self.moe.layer(l).experts.__dict__.pop("forward", None)


def batch_indices(n_rows: int, batch_size: int, step: int, seed: int) -> torch.Tensor:
    """Rows of batch `step`: a seeded permutation per epoch, so the data position is just the step."""
    start = step * batch_size
    out = []
    while len(out) < batch_size:
        epoch, pos = divmod(start + len(out), n_rows)
        perm = torch.randperm(n_rows, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
        out.extend(perm[pos : pos + batch_size - len(out)].tolist())
    return torch.tensor(out)


class Trainer:
    """AdamW over the compact expert tensors; step, optimizer and data position can be saved and resumed."""

    def __init__(self, sel: SelectiveExperts, rows_NL: torch.Tensor, cfg: TrainConfig):
        if rows_NL.shape[0] == 0:
            raise ValueError("no training rows: the dataset's train split is empty")
        self.sel, self.rows, self.cfg = sel, rows_NL, cfg
        self.opt = torch.optim.AdamW(sel.parameters(), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), weight_decay=cfg.weight_decay)
        self.step = 0
        self.losses: list[float] = []

    def optimizer_state_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for st in self.opt.state.values() for t in st.values() if torch.is_tensor(t))

    def train(self, until: int | None = None, on_step: Callable[[int, float], None] | None = None) -> None:
        model = self.sel.moe.model
        model.train()
        for step in range(self.step, self.cfg.steps if until is None else min(until, self.cfg.steps)):
            ids_BL = self.rows[batch_indices(self.rows.shape[0], self.cfg.batch_size, step, self.cfg.seed)]
            loss = model(input_ids=ids_BL, labels=ids_BL).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.sel.parameters(), self.cfg.clip)
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
            self.step = step + 1
            self.losses.append(loss.item())
            if on_step is not None:
                on_step(self.step, self.losses[-1])

    def save_state(self, path: Path, extra: dict | None = None) -> None:
        """Trainable slices, AdamW moments, step and data position, committed atomically into `path`.

        The tensors go to files named by step; state.json, replaced atomically last, names them. A
        crash at any point leaves the previous state.json and the files it names intact.
        """
        path.mkdir(parents=True, exist_ok=True)
        params = {f"{l}.gate_up": self.sel.gate_up[l].detach() for l in self.sel.by_layer}
        params |= {f"{l}.down": self.sel.down[l].detach() for l in self.sel.by_layer}
        opt_t = {f"{i}.{k}": torch.as_tensor(v) for i, st in self.opt.state_dict()["state"].items() for k, v in st.items()}
        files = {"trainable": f"trainable-{self.step}.safetensors", "optimizer": f"optimizer-{self.step}.safetensors"}
        for name, tensors in (("trainable", params), ("optimizer", opt_t)):
            save_file({k: v.contiguous() for k, v in tensors.items()}, path / files[name])
            fsync_path(path / files[name])
        meta = {"step": self.step, "losses": self.losses, "config": self.cfg.model_dump(), "files": files,
                "selection": self.sel.selection.to_esft(), **(extra or {})}
        atomic_write(path / "state.json", json.dumps(meta))
        for f in [*path.glob("*.safetensors"), *path.glob(".state.json.*.tmp")]:  # what a killed save left
            if f.name not in files.values():
                f.unlink()

    def load_state(self, path: Path) -> dict:
        meta = json.loads((path / "state.json").read_text())
        if meta["selection"] != self.sel.selection.to_esft():
            raise ValueError(f"{path}: saved state is for a different expert selection; remove it to start afresh")
        params = load_file(path / meta["files"]["trainable"])
        with torch.no_grad():
            for l in self.sel.by_layer:
                self.sel.gate_up[l].copy_(params[f"{l}.gate_up"])
                self.sel.down[l].copy_(params[f"{l}.down"])
        opt_t = load_file(path / meta["files"]["optimizer"])
        state: dict[int, dict] = {}
        for key, v in opt_t.items():
            i, name = key.split(".", 1)
            state.setdefault(int(i), {})[name] = v
        sd = self.opt.state_dict()
        sd["state"] = state
        self.opt.load_state_dict(sd)
        self.step, self.losses = int(meta["step"]), list(meta["losses"])
        return meta



class Stopped(Exception):
    """Training was asked to stop (SIGTERM); the state is saved and the next run resumes there."""


def train_resumable(sel: SelectiveExperts, rows_NL: torch.Tensor, cfg: TrainConfig, state_dir: Path,
                    checkpoint_every: int, report: Callable[[int, float, float], None], say: Callable[[str], None],
                    stop: Callable[[], bool] = lambda: False, discard_mismatch: bool = False,
                    extra: dict | None = None) -> tuple[Trainer, int]:
    """The one training path of `expertmesh train` and the miner's inner loop; (trainer, resumed_from).

    Resumes from `state_dir` when it holds a state (a state for another selection is an error, or,
    with `discard_mismatch`, dropped), trains to cfg.steps calling report(step, loss, tokens/s),
    saves the state every `checkpoint_every` steps (0: never) and, when `stop()` says so, saves it
    and raises Stopped.
    """
    trainer = Trainer(sel, rows_NL, cfg)
    resumed_from = 0
    if (state_dir / "state.json").is_file():
        try:
            trainer.load_state(state_dir)
            resumed_from = trainer.step
            say(f"resuming the inner loop from step {resumed_from}/{cfg.steps} ({state_dir})")
        except ValueError as exc:
            if not discard_mismatch:
                raise
            say(f"discarding saved inner state: {exc}")
            trainer = Trainer(sel, rows_NL, cfg)
    tokens_per_step = cfg.batch_size * rows_NL.shape[1]
    t0, step0 = time.monotonic(), trainer.step

    def on_step(step: int, loss: float) -> None:
        report(step, loss, (step - step0) * tokens_per_step / max(time.monotonic() - t0, 1e-9))
        if checkpoint_every and step < cfg.steps and step % checkpoint_every == 0:
            trainer.save_state(state_dir, extra)
        if stop() and step < cfg.steps:
            trainer.save_state(state_dir, extra)
            raise Stopped(f"stopped at inner step {step}/{cfg.steps}; the next start resumes there")

    trainer.train(on_step=on_step)
    return trainer, resumed_from
