"""Finding 4: with min_score = 0, random perturbations that lowered the fixed rows' loss by chance were
accepted. The noise rule (the delta's signs must agree with the held-out gradient at z ≥ min_z) refuses
all six, while an honest delta in the same round passes it by a wide margin."""
import torch

from arena import fresh_key
from expertmesh.protocol.experts import expert_keys


def test_six_noise_deltas_under_six_fresh_keys_none_accepted(live, honest_math):
    v = live(rounds={"max_submissions": 7})
    moe_shapes = honest_math.delta  # noise on three of the math experts, so ownership does not decide it
    experts = sorted(honest_math.selection)[:3]
    g = torch.Generator().manual_seed(4)
    noise = []
    for _ in range(6):
        delta = {k: torch.randn(moe_shapes[k].shape, generator=g) * 1e-3 for le in experts for k in expert_keys(*le)}
        noise.append(v.submit(fresh_key(), delta))
    honest = v.submit(fresh_key(), honest_math.delta)
    verdicts = v.verdicts(noise + [honest])
    codes = [verdicts[d]["code"] for d in noise]
    print("noise verdicts:", [(r["code"], r["sign_z"], r["new_loss"] - r["base_loss"]) for r in map(verdicts.get, noise)])
    assert all(verdicts[d]["verdict"] != "accepted" and verdicts[d]["weight"] is None for d in noise), codes
    assert set(codes) <= {"noise", "no_gain"}, codes
    h = verdicts[honest]
    assert h["verdict"] == "accepted" and h["sign_z"] > 10, h
    assert v.manifest(1)["accepted"][0]["submission"] == honest
