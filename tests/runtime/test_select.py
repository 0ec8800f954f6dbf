import pytest

from expertmesh.node.select import SelectionError, from_esft_json, jaccard, select_experts, to_esft_json


def profile(counts, gate=None, tokens=10, k=2):
    gate = gate or [c / k for c in counts]
    return {"tokens": tokens, "top_k": k, "layers": {"0": {"counts": counts, "gate_sum": gate}}}


def test_token_score_includes_the_expert_that_crosses_p():
    # token scores: 0.4, 0.3, 0.2, 0.1 (counts / (N*k) with N*k = 20)
    prof = profile([6, 8, 2, 4])
    assert select_experts(prof, p=0.3) == {0: [1]}  # 0.4 >= 0.3 after one expert
    assert select_experts(prof, p=0.5) == {0: [0, 1]}  # 0.4 + 0.3 crosses 0.5
    assert select_experts(prof, p=0.7) == {0: [0, 1]}  # reaching p exactly stops
    assert select_experts(prof, p=1.0) == {0: [0, 1, 2, 3]}


def test_gate_score_uses_gate_mass_per_token():
    prof = profile([5, 5, 5, 5], gate=[1.0, 6.0, 2.0, 1.0], tokens=10)  # scores 0.1 0.6 0.2 0.1
    assert select_experts(prof, score="gate", p=0.7) == {0: [1, 2]}
    assert select_experts(prof, score="token", p=0.2) == {0: [0]}  # ties break by expert id


def test_min_and_max_per_layer():
    prof = profile([20, 0, 0, 0])
    assert select_experts(prof, p=0.1, min_per_layer=3) == {0: [0, 1, 2]}
    assert select_experts(profile([5, 5, 5, 5]), p=1.0, max_per_layer=2) == {0: [0, 1]}


@pytest.mark.parametrize("p", [0, -0.1, 1.5])
def test_p_outside_unit_interval_is_rejected(p):
    with pytest.raises(SelectionError, match="--p"):
        select_experts(profile([1, 1]), p=p)


def test_esft_json_round_trip_and_validation():
    doc = to_esft_json({3: [5, 1], 0: [2]})
    assert doc == {"experts": {"0": [2], "3": [5, 1]}, "shared_experts": False, "non_expert_modules": False}
    assert from_esft_json(doc) == {0: [2], 3: [1, 5]}
    with pytest.raises(SelectionError):
        from_esft_json({"layers": {}})
    with pytest.raises(SelectionError, match="no experts"):
        from_esft_json({"experts": {"0": []}})


def test_jaccard():
    assert jaccard({0: [1, 2]}, {0: [2, 3]}) == pytest.approx(1 / 3)
    assert jaccard({0: [1]}, {1: [1]}) == 0.0
