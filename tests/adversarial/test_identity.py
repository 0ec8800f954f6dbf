"""Finding 6: identity was free. Any key was accepted with no registration or cost, so `max_per_miner`
limited nothing against many keys, while each evaluated submission costs the validator seconds.

Now (validator `[admission]`): every delta needs a commitment first, and a commitment from a key
without standing (no accepted delta in a published version) carries a proof of work of `pow_bits`
(default 22: about 2^22 sha256 calls); keys with standing, and keys on an operator's allow list,
commit without one. An allow list, when set, admits only its keys."""
import hashlib
import time

import pytest

from arena import fresh_key
from valhelpers import encode, submit

from expertmesh.protocol import identity
from expertmesh.protocol.client import sign_commit
from expertmesh.protocol.commit import commitment, work_bits
from expertmesh.protocol.envelope import parse_body
from expertmesh.protocol.errors import RemoteError
from expertmesh.validator.config import AdmissionSection

DEFAULT_BITS = AdmissionSection().pow_bits


def commit(v, key, payload: bytes, pow_bits: int):
    info = v.client.get_round()
    return v.client.commit_delta(sign_commit(key, payload, model_version=info.model_version,
                                             model_sha256=info.model_sha256, round=info.round, domain="math",
                                             pow_bits=pow_bits))


def test_a_new_key_pays_a_proof_of_work_and_accepted_work_exempts_it(live, honest_math, second_math):
    v = live(rounds={"max_submissions": 1}, admission={"pow_bits": DEFAULT_BITS})
    info = v.client.get_round()
    assert info.pow_bits == DEFAULT_BITS == 22
    miner = fresh_key()
    payload = encode(honest_math.delta, info.model_version)
    for bits in (0, 12):
        with pytest.raises(RemoteError) as err:
            commit(v, miner, payload, bits)
        assert err.value.code == "PERMISSION_DENIED" and f"asks {DEFAULT_BITS}" in err.value.details, err.value
    t0 = time.perf_counter()
    env = sign_commit(miner, payload, model_version=info.model_version, model_sha256=info.model_sha256,
                      round=info.round, domain="math", pow_bits=DEFAULT_BITS)
    print(f"proof of work of {DEFAULT_BITS} bits: {time.perf_counter() - t0:.1f} s")
    pk = identity.public_bytes(miner)
    label = parse_body(env.body).label
    assert work_bits(pk, commitment(pk, hashlib.sha256(payload).digest()), label) >= DEFAULT_BITS
    v.client.commit_delta(env)
    digest = submit(v.client, miner, payload, commit=False)[0].submission_id.hex()
    assert v.verdicts([digest])[digest]["verdict"] == "accepted"
    v.manifest(1)
    # Round 2: the miner has standing and commits without work; a newcomer still pays.
    nxt = encode(second_math.delta, 1)
    assert commit(v, miner, nxt, 0).round == v.client.get_round().round
    with pytest.raises(RemoteError) as err:
        commit(v, fresh_key(), nxt, 0)
    assert err.value.code == "PERMISSION_DENIED"


def test_an_allow_list_admits_only_its_keys_and_commitments_are_bounded(live, honest_math, tmp_path):
    listed, stranger = fresh_key(), fresh_key()
    allow = tmp_path / "allow.txt"
    allow.write_text(f"# the operator's miners\n{identity.key_id(identity.public_bytes(listed))}\n")
    v = live(admission={"allow_file": str(allow), "pow_bits": DEFAULT_BITS, "max_commits": 4})
    version = v.client.get_round().model_version
    payloads = [encode({k: t * (1 + i / 10) for k, t in honest_math.delta.items()}, version) for i in range(5)]
    for p in payloads[:4]:
        commit(v, listed, p, 0)  # listed keys are vouched for: no proof of work
    commit(v, listed, payloads[0], 0)  # the same commitment again: the same receipt, not a new one
    with pytest.raises(RemoteError) as err:
        commit(v, listed, payloads[4], 0)
    assert err.value.code == "RESOURCE_EXHAUSTED" and "4 commitments" in err.value.details
    with pytest.raises(RemoteError) as err:
        commit(v, stranger, payloads[0], DEFAULT_BITS)
    assert err.value.code == "PERMISSION_DENIED" and "allow list" in err.value.details
