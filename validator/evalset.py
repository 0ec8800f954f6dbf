"""What a round scores on: its scored domains and their fixed rows, frozen when the round opens.

Scored domains: `scoring.domains` when set; else, with `scoring.open_domains`, every domain with a
registered dataset; else only the domains of datasets the operator registered (`datasets.preload`,
owned by the validator's key). A round's spec ({domain: dataset ids}) lists the datasets with
held-out records registered by the time it opened and is stored with the round (ledger
rounds.eval_spec), so a later registration applies from the next round. Per domain, the held-out
texts of its datasets are put in the validator's secret order (protocol.heldout.eval_order),
tokenized, one keyed 512-token piece of each (so the rows span many records) packed into rows of
seq_len, cut at scoring.eval_tokens (node.jobs.heldout_rows). Per domain too, the experts it
owns: ESFT's selection at scoring.owned_p on the validator's own routing profile of the round's model
over the first scoring.profile_tokens of the domain's train texts. Same spec, key, model and
tokenizer: same rows and owners, so a restarted validator scores exactly as before.
"""
from __future__ import annotations

from expertmesh.node.jobs import data_rows, heldout_rows
from expertmesh.node.profile import RoutingProfile, batches
from expertmesh.node.select import select_experts
from expertmesh.protocol.experts import ExpertSet
from expertmesh.validator.config import ScoringSection
from expertmesh.validator.ledger import Ledger
from expertmesh.validator.registry import Registry
from expertmesh.validator.scoring import EvalRows


def eval_spec(ledger: Ledger, cfg: ScoringSection, operator: str, before_ms: int) -> dict[str, list[str]]:
    """{domain: dataset ids with held-out records registered by `before_ms`} for the domains scored then."""
    rows = ledger.datasets(before_ms=before_ms)
    if cfg.domains:
        scored = set(cfg.domains)
    elif cfg.open_domains:
        scored = {r.domain for r in rows}
    else:
        scored = {r.domain for r in rows if r.owner == operator}
    spec: dict[str, list[str]] = {}
    for row in rows:
        if row.heldout_records and row.domain in scored:
            spec.setdefault(row.domain, []).append(row.dataset_id)
    return spec


def build_rows(tokenizer, registry: Registry, spec: dict[str, list[str]], cfg: ScoringSection) -> EvalRows:
    domain_NL = {}
    for domain, ids in sorted(spec.items()):
        rows_NL = heldout_rows(tokenizer, registry.heldout_texts(ids), registry.heldout_key, cfg.eval_tokens,
                               cfg.seq_len)
        if rows_NL.shape[0]:  # fewer held-out tokens than one row: the domain cannot be scored
            domain_NL[domain] = rows_NL
    return EvalRows(domain_NL, cfg.batch_size)


def owned_experts(moe, tokenizer, registry: Registry, spec: dict[str, list[str]], cfg: ScoringSection
                  ) -> dict[str, ExpertSet]:
    owned = {}
    for domain, ids in sorted(spec.items()):
        rows_NL = data_rows(tokenizer, registry.train_texts(ids), cfg.profile_tokens, cfg.seq_len)
        if not rows_NL.shape[0]:
            owned[domain] = ExpertSet([])
            continue
        profile = RoutingProfile(moe).run(batches(rows_NL, cfg.batch_size)).to_json()
        owned[domain] = select_experts(profile, "token", cfg.owned_p)
    return owned
