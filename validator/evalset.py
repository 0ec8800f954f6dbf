"""The fixed evaluation rows of a round, built from its frozen list of held-out datasets.

Per domain: the held-out texts of its datasets (in registration order, records in stored order),
tokenized and packed into rows of seq_len, cut at scoring.eval_tokens. The general mix takes an equal
number of leading rows from every domain, up to scoring.general_tokens. Same spec, same tokenizer:
same rows, so a restarted validator scores exactly as before.
"""
from __future__ import annotations

import torch

from expertmesh.node.jobs import data_rows
from expertmesh.validator.config import ScoringSection
from expertmesh.validator.ledger import Ledger
from expertmesh.validator.registry import Registry
from expertmesh.validator.scoring import EvalRows


def eval_spec(ledger: Ledger, domains: tuple[str, ...], before_ms: int) -> dict[str, list[str]]:
    """{domain: dataset ids with held-out records registered by `before_ms`} for the evaluated domains."""
    spec: dict[str, list[str]] = {}
    for row in ledger.datasets(before_ms=before_ms):
        if row.heldout_records and (not domains or row.domain in domains):
            spec.setdefault(row.domain, []).append(row.dataset_id)
    return spec


def build_rows(tokenizer, registry: Registry, spec: dict[str, list[str]], cfg: ScoringSection) -> EvalRows:
    domain_NL = {}
    for domain, ids in sorted(spec.items()):
        rows_NL = data_rows(tokenizer, registry.heldout_texts(ids), cfg.eval_tokens, cfg.seq_len)
        if rows_NL.shape[0]:  # fewer held-out tokens than one row: the domain cannot be scored
            domain_NL[domain] = rows_NL
    if domain_NL:
        per_domain = max(1, cfg.general_tokens // cfg.seq_len // len(domain_NL))
        general_NL = torch.cat([r[:per_domain] for _, r in sorted(domain_NL.items())])
    else:
        general_NL = torch.empty(0, cfg.seq_len, dtype=torch.long)
    return EvalRows(domain_NL, general_NL, cfg.batch_size)
