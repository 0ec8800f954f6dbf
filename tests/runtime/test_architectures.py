"""Profile -> select -> train on tiny random configs of every supported architecture."""
import copy

import pytest
import torch

from expertmesh.node.moe import wrap
from expertmesh.node.profile import RoutingProfile, batches
from expertmesh.node.select import select_experts
from expertmesh.node.train import SelectiveExperts, TrainConfig, Trainer
from expertmesh.protocol.experts import ExpertSet

SMALL = dict(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, eos_token_id=0, bos_token_id=0, pad_token_id=0)


def build(arch: str):
    import transformers as tf

    torch.manual_seed(0)
    if arch == "qwen3_moe":
        cfg = tf.Qwen3MoeConfig(**SMALL, num_experts=16, num_experts_per_tok=4, moe_intermediate_size=16, head_dim=8)
        return tf.Qwen3MoeForCausalLM(cfg)
    if arch == "olmoe":
        return tf.OlmoeForCausalLM(tf.OlmoeConfig(**SMALL, num_experts=16, num_experts_per_tok=4))
    if arch == "mixtral":
        return tf.MixtralForCausalLM(tf.MixtralConfig(**SMALL, num_local_experts=8, num_experts_per_tok=2))
    if arch == "qwen2_moe":
        cfg = tf.Qwen2MoeConfig(**SMALL, num_experts=16, num_experts_per_tok=4, moe_intermediate_size=16,
                                shared_expert_intermediate_size=32)
        return tf.Qwen2MoeForCausalLM(cfg)
    if arch == "deepseek_v3":
        cfg = tf.DeepseekV3Config(**{**SMALL, "num_hidden_layers": 3, "num_key_value_heads": 4}, n_routed_experts=16, num_experts_per_tok=4,
                                  moe_intermediate_size=16, first_k_dense_replace=1, n_shared_experts=1, n_group=4,
                                  topk_group=2, kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8,
                                  v_head_dim=8)
        return tf.DeepseekV3ForCausalLM(cfg)
    raise AssertionError(arch)


ARCHS = ["qwen3_moe", "olmoe", "mixtral", "qwen2_moe", "deepseek_v3"]


@pytest.mark.parametrize("arch", ARCHS)
def test_profile_select_train_touches_only_selected_experts(arch):
    model = build(arch)
    moe = wrap(model, arch)
    if arch == "deepseek_v3":
        assert [l.index for l in moe.layers] == [1, 2], "the dense first layer is not an MoE layer"
    if arch in ("qwen2_moe", "deepseek_v3"):
        assert all(l.shared is not None for l in moe.layers)
    rows = torch.randint(1, 256, (8, 32), generator=torch.Generator().manual_seed(1))

    prof = RoutingProfile(moe).run(batches(rows, 4))
    for lay in moe.layers:
        assert int(prof.counts[lay.index].sum()) == rows.numel() * moe.top_k
        assert prof.gate_sum[lay.index].sum() > 0
    selection = select_experts(prof.to_json(), "token", p=0.3)
    assert set(selection.layers()) == {l.index for l in moe.layers}

    before = copy.deepcopy(model.state_dict())
    sel = SelectiveExperts(moe, selection)
    trainer = Trainer(sel, rows, TrainConfig(steps=3, lr=1e-2, batch_size=4))
    trainer.train()
    sel.detach()
    assert {k: torch.equal(v, model.state_dict()[k]) for k, v in before.items()} == {k: True for k in before}, \
        "training must not write into the frozen model"

    delta = sel.delta()
    expected = {f"layers.{l}.experts.{e}.{p}" for l, e in selection for p in ("gate_proj", "up_proj", "down_proj")}
    assert set(delta) == expected and set(selection.keys()) == expected
    assert all(d.abs().sum() > 0 for d in delta.values()), "every selected expert changed"

    moe.add_delta(delta)  # materialise the trained experts: only their slices may differ from before
    after = model.state_dict()
    for name, old in before.items():
        if not (name.endswith("experts.gate_up_proj") or name.endswith("experts.down_proj")):
            assert torch.equal(old, after[name]), f"{name} changed"
            continue
        layer = int(name.split(".")[2])
        changed = (old != after[name]).flatten(1).any(dim=1).nonzero().flatten().tolist()
        assert changed == list(selection.layers().get(layer, ())), f"{name}: changed experts {changed}"

    # AdamW moments exist for the selected slices only: two fp32 tensors per trainable parameter
    n_train = sel.num_parameters()
    assert trainer.optimizer_state_bytes() == pytest.approx(2 * 4 * n_train, abs=64)
    expert_params = sum(l.experts.gate_up_proj.numel() + l.experts.down_proj.numel() for l in moe.layers)
    assert n_train / expert_params == pytest.approx(len(selection) / sum(l.num_experts for l in moe.layers))


def test_optimizer_state_scales_with_selected_fraction():
    moe = wrap(build("qwen3_moe"))
    rows = torch.randint(1, 256, (4, 16), generator=torch.Generator().manual_seed(2))
    sizes = {}
    for n in (2, 8):
        moe.model.load_state_dict(build("qwen3_moe").state_dict())
        sel = SelectiveExperts(moe, ExpertSet((l.index, e) for l in moe.layers for e in range(n)))
        tr = Trainer(sel, rows, TrainConfig(steps=1, batch_size=2))
        tr.train()
        sel.detach()
        sizes[n] = tr.optimizer_state_bytes()
    assert sizes[8] == pytest.approx(4 * sizes[2], rel=0.01)
