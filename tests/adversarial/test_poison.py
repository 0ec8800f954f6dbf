"""Finding 3: an outsider registered a new domain, trained "its" delta on the math experts against
math, claimed 2⁶³−1 tokens and erased a round of math progress, while the general guard (an average
over domains) fell. Now: new domains are scored only when the operator enables them, a delta may
touch only its domain's experts (the validator's own profile), and every other scored domain is
guarded on its own."""
import pytest
import torch

from arena import MAX_U63, fresh_key
from expertmesh.protocol.errors import RemoteError
from expertmesh.validator.registry import write_payload
from valhelpers import train_delta


def math_ascent(selection, math_texts, per_expert_ratio: float) -> dict[str, torch.Tensor]:
    """+∇ of math loss on the given experts (what raises math loss fastest), each expert scaled to
    `per_expert_ratio` of its weights' norm: under the validator's norm cap."""
    from expertmesh.node.jobs import data_rows
    from expertmesh.node.moe import load_model
    from expertmesh.node.paths import DEFAULT_MODEL
    from expertmesh.protocol.experts import expert_keys
    from expertmesh.validator.scoring import loss_grads

    moe, tokenizer = load_model(DEFAULT_MODEL)
    grads = loss_grads(moe, selection, data_rows(tokenizer, math_texts[:200], 8 * 256), 8)
    out = {}
    for le in selection:
        keys = list(expert_keys(*le))
        g = torch.sqrt(sum(grads[k].pow(2).sum() for k in keys))
        w = torch.sqrt(sum(moe.weight(k).pow(2).sum() for k in keys))
        out.update({k: grads[k] * (per_expert_ratio * w / g) for k in keys})
    return out


def test_an_outsider_cannot_poison_a_domain_it_does_not_train(live, honest_math, math_texts, literature_texts,
                                                              tmp_path):
    v = live(rounds={"max_submissions": 3})
    outsider = fresh_key()
    v.register(outsider, write_payload(literature_texts[:1500], tmp_path / "poetry.jsonl"), "poetry")
    assert v.client.get_round().domains == ("literature", "math"), "a domain nobody enabled is not scored"

    against_math = {k: -2.0 * t for k, t in honest_math.delta.items()}  # the math experts, pulled back
    with pytest.raises(RemoteError, match="not scored") as exc:
        v.submit(outsider, against_math, domain="poetry", tokens=MAX_U63)
    assert exc.value.code == "FAILED_PRECONDITION"

    foreign = v.submit(outsider, against_math, domain="literature", tokens=MAX_U63)
    lit = train_delta(literature_texts[:1000], seed=3)
    hidden = {k: lit.delta[k] + a for k, a in math_ascent(lit.selection, math_texts, 0.3).items()}
    guarded = v.submit(fresh_key(), hidden, domain="literature", tokens=MAX_U63)
    honest = v.submit(fresh_key(), honest_math.delta)
    rows = v.verdicts([foreign, guarded, honest])
    assert rows[foreign]["verdict"] == "rejected" and rows[foreign]["code"] == "foreign_experts", rows[foreign]
    g = rows[guarded]
    assert g["verdict"] == "rejected" and g["code"] == "domain_guard" and "'math'" in g["reason"], g
    assert rows[honest]["verdict"] == "accepted"
    assert [a["submission"] for a in v.manifest(1)["accepted"]] == [honest]
