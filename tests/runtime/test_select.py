import pytest

from expertmesh.node.select import SelectionError, read_esft, select_experts
from expertmesh.node.moe import wrap
from expertmesh.protocol.experts import ExpertSet
from tests.runtime.test_architectures import build


def S(layers):
    return ExpertSet.from_layers(layers)


def profile(counts, gate=None, tokens=10, k=2):
    gate = gate or [c / k for c in counts]
    return {"tokens": tokens, "top_k": k, "layers": {"0": {"counts": counts, "gate_sum": gate}}}


def test_token_score_includes_the_expert_that_crosses_p():
    # token scores: 0.4, 0.3, 0.2, 0.1 (counts / (N*k) with N*k = 20)
    prof = profile([6, 8, 2, 4])
    assert select_experts(prof, p=0.3) == S({0: [1]})  # 0.4 >= 0.3 after one expert
    assert select_experts(prof, p=0.5) == S({0: [0, 1]})  # 0.4 + 0.3 crosses 0.5
    assert select_experts(prof, p=0.7) == S({0: [0, 1]})  # reaching p exactly stops
    assert select_experts(prof, p=1.0) == S({0: [0, 1, 2, 3]})


def test_gate_score_uses_gate_mass_per_token():
    prof = profile([5, 5, 5, 5], gate=[1.0, 6.0, 2.0, 1.0], tokens=10)  # scores 0.1 0.6 0.2 0.1
    assert select_experts(prof, score="gate", p=0.7) == S({0: [1, 2]})
    assert select_experts(prof, score="token", p=0.2) == S({0: [0]})  # ties break by expert id


def test_min_and_max_per_layer():
    prof = profile([20, 0, 0, 0])
    assert select_experts(prof, p=0.1, min_per_layer=3) == S({0: [0, 1, 2]})
    assert select_experts(profile([5, 5, 5, 5]), p=1.0, max_per_layer=2) == S({0: [0, 1]})


@pytest.mark.parametrize("p", [0, -0.1, 1.5])
def test_p_outside_unit_interval_is_rejected(p):
    with pytest.raises(SelectionError, match="--p"):
        select_experts(profile([1, 1]), p=p)


def test_esft_file_is_checked_against_the_model():
    moe = wrap(build("qwen3_moe"))
    n = moe.layers[0].num_experts
    assert read_esft(S({0: [2], 1: [0]}).to_esft(), moe) == S({0: [2], 1: [0]})
    with pytest.raises(SelectionError, match="not an MoE layer"):
        read_esft(S({7: [0]}).to_esft(), moe)
    with pytest.raises(SelectionError, match=f"experts 0..{n - 1}"):
        read_esft(S({0: [n]}).to_esft(), moe)
    with pytest.raises(SelectionError, match="no experts"):
        read_esft({"experts": {"0": []}})
    with pytest.raises(SelectionError, match="not an ESFT experts file"):
        read_esft({"layers": {}})
