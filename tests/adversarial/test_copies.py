"""Finding 5: an honest delta plus noise down to cosine 0.90 kept the full score, and the first arrival
won a copy dispute, so whoever saw a payload on the (plaintext) wire could front-run its author.

Now a delta is taken only after a commitment to its payload (CommitDelta, protocol.commit), copies are
judged in the order of commitments, and the copy rule asks whether what is left of a delta, with the
earlier deltas most like it projected out, still agrees with the held-out gradient beyond chance
(copy_z). A copy, scaled and buried in noise, leaves only the noise; an honest miner's own work stays."""
import pytest
import torch

from arena import fresh_key
from valhelpers import encode, submit

from expertmesh.protocol.client import sign_commit, sign_upload
from expertmesh.protocol.errors import RemoteError
from expertmesh.validator.scoring import cosine


def buried(delta: dict, scale: float, noise: float, seed: int) -> dict:
    """scale·Δ plus Gaussian noise of norm noise·‖scale·Δ‖."""
    g = torch.Generator().manual_seed(seed)
    n = {k: torch.randn(v.shape, generator=g) for k, v in delta.items()}
    size = sum(float(v.pow(2).sum()) for v in delta.values()) ** 0.5 * scale
    n_size = sum(float(v.pow(2).sum()) for v in n.values()) ** 0.5
    return {k: scale * v + noise * size / n_size * n[k] for k, v in delta.items()}


def test_a_front_runner_with_a_buried_copy_loses_to_the_author(live, honest_math):
    v = live(rounds={"max_submissions": 3, "max_per_miner": 1})
    author, thief, thief2 = fresh_key(), fresh_key(), fresh_key()
    info = v.client.get_round()
    payload = encode(honest_math.delta, info.model_version)
    fields = dict(model_version=info.model_version, model_sha256=info.model_sha256, round=info.round, domain="math")
    v.client.commit_delta(sign_commit(author, payload, **fields, pow_bits=info.pow_bits))
    # The author's upload is seen on the wire; two thieves commit and upload before the author's upload lands.
    loud = buried(honest_math.delta, 1.0, 0.5, seed=1)  # cosine ~0.9: the old threshold (0.98) let it through
    quiet = buried(honest_math.delta, 0.5, 2.0, seed=2)  # half of it in four times its size of noise: cosine ~0.45
    assert cosine(loud, honest_math.delta) < 0.95 and cosine(quiet, honest_math.delta) < 0.5
    first = submit(v.client, thief, encode(loud, info.model_version))[0].submission_id.hex()
    second = submit(v.client, thief2, encode(quiet, info.model_version))[0].submission_id.hex()
    own = v.client.submit_delta(payload, sign_upload("delta", author, payload, **fields)).submission_id.hex()
    verdicts = v.verdicts([first, second, own])
    print({d[:8]: (r["code"], r["sign_z"], r["copy_z"], r["max_cosine"], r["score"]) for d, r in verdicts.items()})
    assert verdicts[own]["verdict"] == "accepted", verdicts[own]
    for thief_digest in (first, second):
        row = verdicts[thief_digest]
        assert row["verdict"] == "rejected" and row["code"] == "copy" and row["copy_of"] == own, row
        assert row["sign_z"] >= 4.0, "the noise rule alone would have paid it"
        assert abs(row["copy_z"]) < 4.0
    assert [a["submission"] for a in v.manifest(1)["accepted"]] == [own]


def test_no_payload_without_a_commitment_and_honest_same_domain_miners_both_pass(live, honest_math, second_math):
    v = live(rounds={"max_submissions": 2})
    key = fresh_key()
    info = v.client.get_round()
    with pytest.raises(RemoteError) as err:
        submit(v.client, key, encode(honest_math.delta, info.model_version), commit=False)
    assert err.value.code == "FAILED_PRECONDITION" and "CommitDelta first" in err.value.details
    a = v.submit(key, honest_math.delta)
    b = v.submit(fresh_key(), second_math.delta)  # same domain, similar data: related (cosine ~0.4), not a copy
    verdicts = v.verdicts([a, b])
    assert verdicts[a]["verdict"] == verdicts[b]["verdict"] == "accepted", verdicts
    assert verdicts[b]["max_cosine"] > 0.1 and verdicts[b]["copy_z"] > 4.0 * 2, verdicts[b]
