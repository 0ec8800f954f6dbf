"""Finding 2: a miner's claimed token count bought the merge (weight = score × claim). Weights are now
the scores the validator measured; the claim is recorded and ignored."""
from arena import MAX_U63, fresh_key


def test_a_claimed_token_count_buys_no_weight(live, honest_math, second_math):
    v = live(rounds={"max_submissions": 2})
    other = second_math  # a second honest miner, its own half of the data
    liar = v.submit(fresh_key(), honest_math.delta, tokens=MAX_U63)
    modest = v.submit(fresh_key(), other.delta, tokens=1)
    verdicts = v.verdicts([liar, modest])
    assert all(r["verdict"] == "accepted" for r in verdicts.values()), verdicts
    accepted = {a["submission"]: a for a in v.manifest(1)["accepted"]}
    assert accepted[liar]["tokens"] == MAX_U63 and accepted[modest]["tokens"] == 1
    for digest, row in verdicts.items():
        assert accepted[digest]["weight"] == row["score"] == row["weight"], "weight = the measured score, nothing else"
