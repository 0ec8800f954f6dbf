"""The selective trainer is deterministic under a seed and resumes to the same result."""
import torch

from expertmesh.node.moe import wrap
from expertmesh.node.train import SelectiveExperts, TrainConfig, Trainer
from expertmesh.protocol.experts import ExpertSet
from tests.runtime.test_architectures import build

SELECTION = ExpertSet.from_layers({0: [1, 5, 9], 1: [0, 2]})
ROWS = torch.randint(1, 256, (12, 24), generator=torch.Generator().manual_seed(3))


def fresh(cfg):
    moe = wrap(build("qwen3_moe"))
    sel = SelectiveExperts(moe, SELECTION)
    return sel, Trainer(sel, ROWS, cfg)


def test_resume_from_saved_state_gives_identical_delta(tmp_path):
    cfg = TrainConfig(steps=6, lr=5e-3, batch_size=4, seed=7)
    sel_a, straight = fresh(cfg)
    straight.train()

    sel_b, first = fresh(cfg)
    first.train(until=3)
    first.save_state(tmp_path / "state")
    sel_c, second = fresh(cfg)  # a new process would rebuild exactly this from disk
    second.load_state(tmp_path / "state")
    assert second.step == 3
    second.train()

    assert straight.losses == second.losses
    da, dc = sel_a.delta(), sel_c.delta()
    assert da.keys() == dc.keys()
    assert all(torch.equal(da[k], dc[k]) for k in da)


def test_different_seed_different_batches():
    a, ta = fresh(TrainConfig(steps=2, batch_size=4, seed=0))
    b, tb = fresh(TrainConfig(steps=2, batch_size=4, seed=1))
    ta.train()
    tb.train()
    assert ta.losses != tb.losses


def test_an_interrupted_save_leaves_the_previous_state_usable(tmp_path):
    cfg = TrainConfig(steps=4, lr=5e-3, batch_size=4, seed=7)
    _, first = fresh(cfg)
    first.train(until=2)
    first.save_state(tmp_path / "state")
    # what a kill during the next save leaves: new tensor files and a half-written commit record
    (tmp_path / "state" / "trainable-3.safetensors").write_bytes(b"partial")
    (tmp_path / "state" / ".state.json.k1ll3d.tmp").write_text("{")
    _, second = fresh(cfg)
    second.load_state(tmp_path / "state")
    assert second.step == 2
    second.train(until=3)
    second.save_state(tmp_path / "state")  # and saving again over the debris works
    assert sorted(f.name for f in (tmp_path / "state").iterdir()) == [
        "optimizer-3.safetensors", "state.json", "trainable-3.safetensors"]
