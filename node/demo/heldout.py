"""The demo's yardstick: held-out loss per domain of a model version.

The demo is its validator's operator: it creates the validator's held-out key (protocol.heldout)
and so computes, from its own copy of the data, the very records the validator keeps private and
miners never see, in the validator's scoring order. Rows are fixed (the first `eval_tokens` of each
domain's held-out part in that order), the rows the validator scores on, so versions are compared
on identical tokens.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from expertmesh.node.data import iter_texts
from expertmesh.node.domains import MATH_TEMPLATE, stdlib_texts
from expertmesh.node.evaluate import mean_loss
from expertmesh.node.jobs import heldout_rows
from expertmesh.node.moe import load_model
from expertmesh.node.paths import corpus
from expertmesh.protocol.heldout import DEFAULT_FRACTION, split


@dataclass(frozen=True)
class DomainSource:
    """A built-in domain as `dataset submit` sends it: a file and how to render it."""

    domain: str
    path: Path
    template: str | None = None

    def texts(self) -> list[str]:
        return list(iter_texts(self.path, template=self.template))

    def submit_flags(self) -> list[str]:
        return ["--template", self.template] if self.template else []


def domain_sources(data_dir: Path) -> dict[str, DomainSource]:
    """math = GSM8K (template), literature = Tiny Shakespeare, code = the Python stdlib (written to data_dir)."""
    code = data_dir / "python-stdlib.jsonl"
    if not code.exists():
        from expertmesh.node.domains import write_domain_file

        write_domain_file("code", code, stdlib_texts())
    return {"math": DomainSource("math", corpus("gsm8k_train.jsonl"), MATH_TEMPLATE),
            "literature": DomainSource("literature", corpus("tinyshakespeare.txt")),
            "code": DomainSource("code", code)}


class HeldOut:
    """Fixed held-out rows per domain, tokenized once with the base model's tokenizer."""

    def __init__(self, sources: dict[str, DomainSource], tokenizer, eval_tokens: int, key: bytes | None):
        self.rows_NL: dict[str, torch.Tensor] = {}
        for domain, src in sources.items():
            _, held = split(src.texts(), DEFAULT_FRACTION, key)  # what the demo's validator holds out
            self.rows_NL[domain] = heldout_rows(tokenizer, held, key, eval_tokens)  # and the rows it scores on

    def losses(self, model_dir: Path) -> dict[str, float]:
        moe, _ = load_model(model_dir)
        return {d: round(mean_loss(moe.model, rows), 5) for d, rows in self.rows_NL.items()}
