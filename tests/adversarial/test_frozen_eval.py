"""Finding 7: a dataset registered before a round closed joined that round's evaluation. The scored
domains and datasets are now frozen when a round opens; later registrations count from the next one."""
import pytest

from arena import fresh_key
from expertmesh.protocol.errors import RemoteError
from expertmesh.validator.registry import write_payload


def test_registrations_during_a_round_apply_from_the_next(live, honest_math, math_texts, literature_texts, tmp_path):
    from valhelpers import train_delta

    v = live(scoring={"domains": ["math", "code"]}, rounds={"max_submissions": 2})
    first = v.round_spec(1)
    assert list(first) == ["math"] and v.client.get_round().domains == ("math",)
    early = v.submit(fresh_key(), honest_math.delta)  # a submission is in: round 1's evaluation must not change
    submitter = fresh_key()
    code_set = v.register(submitter, write_payload([f"def f{i}(x):\n    return x + {i}\n" for i in range(400)],
                                                   tmp_path / "code.jsonl"), "code")
    math_more = v.register(submitter, write_payload(math_texts[1000:] + literature_texts[:50], tmp_path / "m.jsonl"),
                           "math")
    info = v.client.get_round()
    assert (info.round, info.domains) == (1, ("math",)) and v.round_spec(1) == first, "round 1 stays frozen"
    with pytest.raises(RemoteError, match="not scored in round 1") as exc:
        v.submit(fresh_key(), honest_math.delta, domain="code")
    assert exc.value.code == "FAILED_PRECONDITION"
    late = v.submit(fresh_key(), train_delta(math_texts[1000:], seed=1).delta)
    rows = v.verdicts([early, late])
    assert all(r["verdict"] == "accepted" and r["eval_tokens"] for r in rows.values()), rows
    assert {r["round"] for r in rows.values()} == {1}
    v.manifest(1)
    second = v.round_spec(2)
    assert second["code"] == [code_set] and set(second["math"]) == set(first["math"]) | {math_more}
    assert v.client.get_round().domains == ("code", "math")
