"""ExpertSet: one validated, ordered type for a set of experts, stored as one JSON object."""
import json

import pytest

from expertmesh.protocol.experts import ExpertSet, expert_key, proj_shape


def test_construction_sorts_dedups_and_validates():
    s = ExpertSet([(1, 7), (0, 3), (0, 1), (0, 3)])
    assert list(s) == [(0, 1), (0, 3), (1, 7)] and len(s) == 3 and (0, 3) in s and (2, 0) not in s
    assert s.layers() == {0: (1, 3), 1: (7,)}
    assert s == ExpertSet.from_layers({1: [7], 0: [3, 1]}) and hash(s) == hash(ExpertSet.from_layers({0: [1, 3], 1: [7]}))
    for bad in ([(0, -1)], [(0, 1.0)], [(True, 0)], [(0,)], [(0, 1_000_000)]):
        with pytest.raises(ValueError, match="pair of integers"):
            ExpertSet(bad)


def test_keys_and_shapes_follow_the_canonical_layout():
    s = ExpertSet([(2, 5)])
    assert s.keys() == [expert_key(2, 5, p) for p in ("gate_proj", "up_proj", "down_proj")]
    assert ExpertSet.from_keys(s.keys() + ExpertSet([(0, 1)]).keys()) == s | ExpertSet([(0, 1)])
    assert s.shape("gate_proj", 32, 16) == s.shape("up_proj", 32, 16) == (16, 32) == proj_shape("gate_proj", 32, 16)
    assert s.shape("down_proj", 32, 16) == (32, 16)
    with pytest.raises(ValueError, match="canonical"):
        ExpertSet.from_keys(["layers.0.experts.1.w1"])


def esft(layers, **flags):
    return {"experts": layers, "shared_experts": False, "non_expert_modules": False, **flags}


def test_stored_form_round_trips_as_an_object_and_parsing_is_strict():
    s = ExpertSet([(10, 2), (2, 0), (2, 4)])
    doc = s.to_esft()
    assert doc == esft({"2": [0, 4], "10": [2]}) and ExpertSet.from_json(json.loads(json.dumps(doc))) == s
    for bad, why in ((esft({}), "at least one layer"), (esft([]), "at least one layer"), ({"0": [1]}, "shared_experts"),
                     (esft({"0": [1]}, shared_experts=True), "shared_experts"), ({**esft({"0": [1]}), "x": 1}, "shared"),
                     (esft({"01": [1]}), "decimal"), (esft({"a": [1]}), "decimal"),
                     (esft({"0": []}), "strictly increasing"), (esft({"0": [3, 1]}), "strictly increasing"),
                     (esft({"0": [1, 1]}), "strictly increasing"), (esft({"0": [True]}), "strictly increasing"),
                     (esft({"0": "1"}), "strictly increasing")):
        with pytest.raises(ValueError, match=why):
            ExpertSet.from_json(bad)


def test_esft_round_trip():
    s = ExpertSet.from_layers({3: [5, 1], 0: [2]})
    doc = s.to_esft()
    assert doc == {"experts": {"0": [2], "3": [1, 5]}, "shared_experts": False, "non_expert_modules": False}
    assert ExpertSet.from_esft(doc) == s
    assert ExpertSet.from_esft({"experts": {"0": [2, 2, 1]}}) == ExpertSet([(0, 1), (0, 2)])  # ESFT files are lists
    with pytest.raises(ValueError, match="not an ESFT experts file"):
        ExpertSet.from_esft({"layers": {}})
    with pytest.raises(ValueError, match="no experts"):
        ExpertSet.from_esft({"experts": {"0": []}})
    with pytest.raises(ValueError, match="shared experts"):
        ExpertSet.from_esft({**doc, "shared_experts": True})


def test_set_operations_and_jaccard():
    a, b = ExpertSet.from_layers({0: [1, 2]}), ExpertSet.from_layers({0: [2, 3]})
    assert a | b == ExpertSet.from_layers({0: [1, 2, 3]}) and a & b == ExpertSet([(0, 2)]) and a - b == ExpertSet([(0, 1)])
    assert a.jaccard(b) == pytest.approx(1 / 3)
    assert ExpertSet([(0, 1)]).jaccard(ExpertSet([(1, 1)])) == 0.0 and ExpertSet().jaccard(ExpertSet()) == 1.0
    assert not ExpertSet() and a
