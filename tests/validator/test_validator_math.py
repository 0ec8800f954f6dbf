"""Checks, scoring and the merge as tensors in, numbers out, on a tiny random Qwen3-MoE."""
import math

import pytest
import torch

from expertmesh.node.moe import wrap
from expertmesh.node.train import SelectiveExperts, TrainConfig, Trainer
from expertmesh.protocol.experts import PROJS, ExpertSet, expert_key
from tests.runtime.test_architectures import build
from expertmesh.validator.checks import CheckFailed, check_delta, expert_norms
from expertmesh.validator.config import MergeSection
from expertmesh.validator.merge import WeightedMean, interference_scales, merge_weight, outer_step
from expertmesh.validator.scoring import EvalRows, applied, base_losses, cosine, evaluate, global_norm, Nearest, nearest, residual, sign_z

PATTERN_NL = torch.arange(1, 33).repeat(12, 1) % 200 + 3  # a fixed sequence: easy to learn, easy to unlearn
NOISE_NL = torch.randint(1, 256, (6, 32), generator=torch.Generator().manual_seed(5))


@pytest.fixture
def moe():
    return wrap(build("qwen3_moe"))


def rand_delta(moe, experts, scale=1e-3, seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = moe.expert_shapes()
    return {expert_key(l, e, p): torch.randn(shapes[expert_key(l, e, p)], generator=g) * scale
            for l, e in experts for p in PROJS}


def test_checks_accept_a_sane_delta_and_name_every_violation(moe):
    """The validator's own checks (declared experts, shapes and finiteness are the decoder's:
    tests/protocol/test_protocol_codec.py::test_decoder_refuses)."""
    norms = expert_norms(moe)
    d = rand_delta(moe, [(0, 1), (1, 3)])
    ok = check_delta(d, 7, 7, norms, 0.5)
    assert list(ok.experts) == [(0, 1), (1, 3)] and 0 < ok.max_expert_ratio < 0.5
    w = math.sqrt(norms[(0, 1)] ** 2 + norms[(1, 3)] ** 2)
    assert ok.relative_norm == pytest.approx(ok.norm / w)

    cases = {
        "version": (d, 6),
        "norm_cap": ({**d, expert_key(1, 3, "gate_proj"): d[expert_key(1, 3, "gate_proj")] * 1e4}, 7),
    }
    for code, (delta, version) in cases.items():
        with pytest.raises(CheckFailed) as exc:
            check_delta(delta, version, 7, norms, 0.5)
        assert exc.value.code == code, (code, str(exc.value))


def test_applied_restores_the_weights_bit_for_bit(moe):
    before = {k: v.clone() for k, v in moe.model.state_dict().items()}
    d = rand_delta(moe, [(0, 2), (1, 5)], scale=0.37)
    with applied(moe, d):
        assert not torch.equal(moe.expert_weights(0, 2)[expert_key(0, 2, "gate_proj")], before["model.layers.0.mlp.experts.gate_up_proj"][2, :16])
    after = moe.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_cosine_sees_copies_negations_and_disjoint_experts(moe):
    a = rand_delta(moe, [(0, 1), (1, 2)], seed=1)
    b = rand_delta(moe, [(0, 3)], seed=2)
    assert cosine(a, {k: v * 3 for k, v in a.items()}) == pytest.approx(1.0)
    assert cosine(a, {k: -v for k, v in a.items()}) == pytest.approx(-1.0)
    assert cosine(a, b) == 0.0
    noisy = {k: v + rand_delta(moe, [(0, 1), (1, 2)], seed=3)[k] * 0.1 for k, v in a.items()}
    assert 0.98 < cosine(a, noisy) < 1.0
    near = nearest(a, iter([("b", b), ("neg", {k: -v for k, v in a.items()}), ("noisy", noisy)]), span=1)
    assert (near.cosine, near.twin) == (cosine(a, noisy), "noisy") and [n for n, _ in near.related] == ["noisy"]
    assert nearest(a, iter([]), span=4) == Nearest(0.0, None, [])


def trained_delta(moe, steps=15):
    sel = SelectiveExperts(moe, ExpertSet((l, e) for l in (0, 1) for e in range(16)))
    Trainer(sel, PATTERN_NL, TrainConfig(steps=steps, lr=3e-3, batch_size=4)).train()
    delta = sel.delta()
    sel.detach()
    return delta


def test_a_trained_delta_scores_and_its_negation_does_not(moe):
    shifted_NL = torch.stack([PATTERN_NL[0].roll(i) for i in range(4)])  # the pattern at 4 phases: gains differ by row
    rows = EvalRows({"pattern": shifted_NL, "noise": NOISE_NL[:4]}, batch_size=4)
    delta = trained_delta(moe)
    base = base_losses(moe, rows)
    good = evaluate(moe, delta, "pattern", rows, base, guard_epsilon=10.0, min_score=0.0, min_z=4.0)
    assert good.verdict == "accepted" and good.score == pytest.approx(good.base_loss - good.new_loss) and good.score > 0.05
    assert good.sign_z > 4.0 and set(good.cross) == {"pattern", "noise"} and good.cross["pattern"] == [good.base_loss, good.new_loss]
    bad = evaluate(moe, {k: -v for k, v in delta.items()}, "pattern", rows, base, guard_epsilon=10.0, min_score=0.0, min_z=4.0)
    assert bad.verdict == "zero" and bad.code == "no_gain" and bad.score == 0.0 and bad.new_loss > bad.base_loss
    # the negation, claimed for the other domain: it raises pattern's loss, and no gain elsewhere excuses that
    guarded = evaluate(moe, {k: -v for k, v in delta.items()}, "noise", rows, base, guard_epsilon=0.0, min_score=0.0,
                       min_z=0.0)
    assert guarded.verdict == "rejected" and guarded.code == "domain_guard" and "'pattern' rose by" in guarded.reason
    again = evaluate(moe, delta, "pattern", rows, base, guard_epsilon=10.0, min_score=0.0, min_z=4.0)
    assert again == good, "same model, delta and rows: the same score"
    high_bar = evaluate(moe, delta, "pattern", rows, base, 10.0, min_score=good.score, min_z=4.0)
    assert high_bar.verdict == "zero" and high_bar.code == "no_gain"
    unsure = evaluate(moe, delta, "pattern", rows, base, 10.0, min_score=0.0, min_z=good.sign_z + 1)
    assert unsure.verdict == "zero" and unsure.code == "noise" and "not told from noise" in unsure.reason


def test_residual_removes_what_earlier_deltas_explain(moe):
    a, b = rand_delta(moe, [(0, 1), (1, 2)], seed=1), rand_delta(moe, [(0, 1), (1, 2)], seed=2)
    noise = rand_delta(moe, [(0, 1), (1, 2)], seed=3)
    mix = {k: 0.5 * a[k] - 2.0 * b[k] + 1e-3 * noise[k] for k in a}
    left, coefs = residual(mix, [a, b])
    assert coefs == pytest.approx([0.5, -2.0], abs=1e-3)
    assert global_norm(left) == pytest.approx(1e-3 * global_norm(noise), rel=0.01)
    part = {expert_key(0, 1, p): a[expert_key(0, 1, p)] for p in PROJS}  # a copy of one of a's two experts
    left, coefs = residual(part, [a])
    assert coefs == pytest.approx([1.0]) and global_norm(left) < 1e-6 * global_norm(part)
    assert residual(a, [])[1] == [] and all(torch.equal(v, a[k]) for k, v in residual(a, [])[0].items())


def test_the_copy_rule_refuses_a_copy_in_noise_and_passes_independent_work(moe):
    rows = EvalRows({"pattern": torch.stack([PATTERN_NL[0].roll(i) for i in range(4)])}, batch_size=4)
    base = base_losses(moe, rows)
    original = trained_delta(moe)
    g = torch.Generator().manual_seed(9)
    size = global_norm(original)
    noise = {k: torch.randn(v.shape, generator=g) for k, v in original.items()}
    scale = 2 * size / global_norm(noise)
    copy = {k: 0.5 * v + scale * noise[k] for k, v in original.items()}  # cosine about 0.24
    assert cosine(copy, original) < 0.5
    plain = evaluate(moe, copy, "pattern", rows, base, 10.0, min_score=0.0, min_z=4.0)
    assert plain.verdict == "accepted", "without the copy rule the buried copy is paid"
    judged = evaluate(moe, copy, "pattern", rows, base, 10.0, 0.0, 4.0, related=[("orig", original)], copy_z=4.0)
    assert judged.verdict == "rejected" and judged.code == "copy" and judged.copy_of == "orig", judged
    assert abs(judged.copy_z) < 4.0 and judged.sign_z > 4.0
    torch.manual_seed(1)
    other = trained_delta(moe, steps=10)  # independent work on the same data: its own steps survive the projection
    mine = evaluate(moe, other, "pattern", rows, base, 10.0, 0.0, 4.0, related=[("orig", original)], copy_z=4.0)
    assert mine.verdict == "accepted" and mine.copy_z >= 4.0, mine


def test_the_merge_guard_holds_worked_domains_to_their_parent_and_tolerates_untrained_ones():
    parent = {"math": 3.0, "literature": 4.0}
    alone = [{"math": 3.0015, "literature": 3.95}]  # a literature delta that raises math a little

    def merged(scales):
        return {"math": 3.0 + 0.0015 * scales[0], "literature": 4.0 - 0.05 * scales[0]}

    untrained, _ = interference_scales(parent, alone, ["literature"], merged, tolerance=0.002, tries=4)
    assert untrained == [1.0], "nobody trained math this round: a rise within the tolerance is allowed"
    worked, after = interference_scales(parent, alone, ["literature"], merged, 0.002, 4, worked={"math"})
    assert worked == [0.0625] and after["math"] < 3.0 + 0.0015 * 0.07, "math's miners tried: halved 4 times"
    off, _ = interference_scales(parent, alone, ["literature"], merged, 0.002, 0, worked={"math"})
    assert off == [1.0]


def test_sign_z_is_the_sign_agreement_statistic():
    g = {"w": torch.tensor([1.0, -2.0, 0.5, 0.0])}
    descent = {"w": torch.tensor([-1.0, 1.0, -1.0, 3.0])}  # every nonzero term agrees with −g
    a = torch.tensor([1.0, 2.0, 0.5, 0.0])
    assert sign_z(g, descent) == pytest.approx(float(a.sum() / a.pow(2).sum().sqrt()))
    assert sign_z(g, {"w": -descent["w"]}) == pytest.approx(-sign_z(g, descent))
    assert sign_z(g, {"w": torch.tensor([0.0, 0.0, 0.0, 1.0])}) == 0.0, "no overlap with the gradient: no evidence"
    one = {"w": torch.tensor([-5.0, 0.0, 0.0, 0.0])}
    assert sign_z(g, one) == pytest.approx(1.0), "one coordinate can never pass: z is at most 1"


def test_weighted_mean_normalises_per_expert():
    a = {"x": torch.full((2,), 1.0), "y": torch.full((2,), 4.0)}
    b = {"x": torch.full((2,), 3.0)}
    m = WeightedMean()
    m.add(a, 1.0)
    m.add(b, 3.0)
    out = m.result()
    assert torch.allclose(out["x"], torch.full((2,), 2.5)) and torch.allclose(out["y"], torch.full((2,), 4.0))
    assert merge_weight(0.5) == 0.5, "the validator's measured score, nothing the miner claims"


def test_outer_nesterov_step_matches_the_formula_over_two_rounds():
    cfg = MergeSection(outer_lr=0.7, momentum=0.9, nesterov=True)
    w0, u1, u2 = torch.tensor([1.0, -2.0]), torch.tensor([0.1, 0.2]), torch.tensor([-0.3, 0.05])
    w1, m1 = outer_step({"k": w0}, {"k": u1}, {}, cfg)
    assert torch.allclose(m1["k"], u1) and torch.allclose(w1["k"], w0 + 0.7 * (u1 + 0.9 * u1))
    w2, m2 = outer_step(w1, {"k": u2}, m1, cfg)
    m_expect = 0.9 * u1 + u2
    assert torch.allclose(m2["k"], m_expect) and torch.allclose(w2["k"], w1["k"] + 0.7 * (u2 + 0.9 * m_expect))
    plain_w, plain_m = outer_step({"k": w0}, {"k": u1}, {"k": u1}, MergeSection(outer_lr=0.5, momentum=0.5, nesterov=False))
    assert torch.allclose(plain_w["k"], w0 + 0.5 * (0.5 * u1 + u1))
    untouched, _ = outer_step({"k": w0, "other": w0}, {"k": u1}, {}, cfg)
    assert set(untouched) == {"k"}, "only experts with a delta get a new weight"
