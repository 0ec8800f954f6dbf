"""The validator as users run it: `expertmesh validator run` in a child process on loopback, real deltas
from the trainer, a real DHT peer, the status CLI, metrics, structured logs and a clean SIGTERM."""
import json
import urllib.request

import pytest
import torch

from expertmesh.protocol.heldout import DEFAULT_FRACTION, split
from expertmesh.node.evaluate import mean_loss
from expertmesh.node.jobs import data_rows
from expertmesh.node.moe import wrap
from expertmesh.node.paths import DEFAULT_MODEL
from expertmesh.protocol import identity
from expertmesh.protocol.client import ClientConfig, ValidatorClient
from expertmesh.protocol.codec import decode_delta
from expertmesh.protocol.types import CheckpointRef
from expertmesh.protocol.manifest import verify
from valhelpers import Daemon, config_doc, encode, ledger_rows, negated, register, submit, wait_until, write_config

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]
KEYS = [identity.generate_key() for _ in range(4)]


@pytest.fixture
def dht():
    from expertmesh.protocol.discovery import DiscoveryConfig, start_dht

    peer = start_dht(DiscoveryConfig())
    yield peer
    peer.shutdown()


def json_logs(daemon: Daemon) -> list[dict]:
    return [json.loads(l) for l in daemon.text().splitlines() if l.startswith("{")]


def test_round_over_the_wire_good_merged_harmful_and_copy_not(tmp_path, trained, math_payload, math_texts, dht, cli):
    from expertmesh.protocol.discovery import find_validators, visible_maddrs

    state = tmp_path / "state"
    doc = config_doc(state, log={"format": "json"}, metrics={"enabled": True},
                     dht={"enabled": True, "initial_peers": visible_maddrs(dht), "announce_every_s": 2})
    daemon = Daemon(write_config(tmp_path / "validator.toml", doc), tmp_path / "validator.log")
    try:
        with ValidatorClient(daemon.address, ClientConfig(call_timeout_s=30, upload_timeout_s=60)) as client:
            register(client, KEYS[3], math_payload)
            good = encode(trained.delta, 0)
            r_good, _ = submit(client, KEYS[0], good)
            r_neg, _ = submit(client, KEYS[1], encode(negated(trained.delta), 0))
            r_copy, _ = submit(client, KEYS[2], good)
            wait_until(lambda: client.get_round().model_version == 1, 600, "version 1", daemon)
            info = client.get_round()
            assert (info.round, info.model_version) == (3, 1), "round 1 had nothing to score; round 2 published"
            client.fetch_manifest(tmp_path / "ckpt" / "manifest.json")
            manifest = json.loads((tmp_path / "ckpt" / "manifest.json").read_text())
            for name, meta in manifest["files"].items():
                client.fetch_checkpoint_file(CheckpointRef(1, name), tmp_path / "ckpt" / name,
                                             bytes.fromhex(meta["sha256"]))
        verify(tmp_path / "ckpt")

        verdicts = {r["digest"]: r for r in ledger_rows(state, "SELECT * FROM verdicts WHERE round=2")}
        v_good, v_neg, v_copy = (verdicts[r.submission_id.hex()] for r in (r_good, r_neg, r_copy))
        assert v_good["verdict"] == "accepted" and v_good["score"] > 0.005
        assert v_neg["verdict"] != "accepted" and v_neg["score"] == 0.0 and v_neg["new_loss"] > v_neg["base_loss"]
        assert v_copy["verdict"] == "rejected" and v_copy["code"] == "copy" and v_copy["copy_of"] == v_good["digest"]
        assert [a["submission"] for a in manifest["accepted"]] == [v_good["digest"]] and manifest["parent"] == 0
        print(f"score good {v_good['score']:.5f} ({v_good['base_loss']:.4f} -> {v_good['new_loss']:.4f}); "
              f"negated {v_neg['score']} ({v_neg['new_loss']:.4f}, {v_neg['reason']})")

        # The published version loads in stock transformers, moved exactly the touched experts by
        # lr·(1+μ)·Δ (first round, one delta: Δ itself with the defaults), and its held-out math loss is below
        # the base's.
        from transformers import AutoModelForCausalLM, AutoTokenizer

        base = wrap(AutoModelForCausalLM.from_pretrained(DEFAULT_MODEL, dtype=torch.float32))
        new = wrap(AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt"))
        assert next(new.model.parameters()).dtype == torch.float32
        sd0, sd1 = base.model.state_dict(), new.model.state_dict()
        assert all(torch.equal(sd0[k], sd1[k]) for k in sd0 if ".experts." not in k)
        decoded = decode_delta(good, new.expert_shapes()).tensors
        merge = manifest["merge"]
        gain = merge["outer_lr"] * ((1 + merge["momentum"]) if merge["nesterov"] else 1.0)
        for lay in base.layers:
            for e in range(lay.num_experts):
                w0, w1 = base.expert_weights(lay.index, e), new.expert_weights(lay.index, e)
                for key, w in w0.items():
                    want = w + gain * decoded[key] if key in decoded else w
                    assert torch.allclose(w1[key], want, atol=1e-6), key
        _, held = split(math_texts, DEFAULT_FRACTION)
        rows = data_rows(AutoTokenizer.from_pretrained(tmp_path / "ckpt"), held, 4096)
        before, after = mean_loss(base.model, rows), mean_loss(new.model, rows)
        print(f"held-out math loss: base {before:.4f} -> version 1 {after:.4f}")
        assert after < before

        r = cli("status", "--validator", daemon.address)
        assert r.returncode == 0, r.stderr
        miner = identity.key_id(identity.public_bytes(KEYS[0]))
        assert "round 3" in r.stdout and "model version 1" in r.stdout and miner[:16] in r.stdout, r.stdout
        assert f"{v_good['score']:.5f}" in r.stdout

        logs = json_logs(daemon)
        url = next(l["url"] for l in logs if l["msg"] == "metrics")
        text = urllib.request.urlopen(url, timeout=10).read().decode()
        assert 'expertmesh_validator_submissions_total{reason="copy",verdict="rejected"} 1.0' in text
        assert 'expertmesh_validator_submissions_total{reason="ok",verdict="accepted"} 1.0' in text
        assert "expertmesh_validator_model_version 1.0" in text
        scored = [l for l in logs if l["msg"] == "scored submission"]
        assert len(scored) == 3 and all({"round", "verdict", "score", "miner"} <= l.keys() for l in scored)

        def announced():
            found = [v for v in find_validators(dht) if v.endpoint == daemon.address]
            return found and found[0].model_version == 1 and found[0].round == 3 and found[0].domains == ("math",)

        wait_until(announced, 60, "the DHT announcement of version 1", daemon, poll_s=1)
        assert daemon.terminate() == 0
        assert json_logs(daemon)[-1]["msg"] == "stopped"
    finally:
        daemon.cleanup()


def test_bad_config_is_one_line_and_exit_2(tmp_path, cli):
    (tmp_path / "v.toml").write_text('[scoring]\ncopy_cosine = 1.5\n')
    r = cli("validator", "run", "--config", str(tmp_path / "v.toml"))
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "scoring.copy_cosine" in r.stderr, r.stderr
    r = cli("status", "--validator", "127.0.0.1:1", "--timeout", "2")
    assert r.returncode == 2 and r.stderr.startswith("error: ") and "Traceback" not in r.stderr, r.stderr
