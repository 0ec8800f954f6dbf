"""The runtime commands through the real CLI on the shipped model, bad input included."""
import json

import pytest

from expertmesh.node.paths import DEFAULT_MODEL

TEMPLATE = "{question}\n{answer}"


@pytest.fixture(scope="module")
def math_file(tmp_path_factory, write_gsm8k):
    return write_gsm8k(tmp_path_factory.mktemp("data") / "math.jsonl", 600)


def test_profile_select_train(cli, math_file, tmp_path):
    r = cli("profile", "--data", str(math_file), "--template", TEMPLATE, "--tokens", "8192",
            "--out", str(tmp_path / "p.json"), "--plot", str(tmp_path / "h.png"))
    assert r.returncode == 0, r.stderr
    prof = json.loads((tmp_path / "p.json").read_text())
    assert prof["tokens"] == 8192 and prof["top_k"] == 4
    assert all(sum(st["counts"]) == 8192 * 4 for st in prof["layers"].values())
    assert (tmp_path / "h.png").read_bytes()[:4] == b"\x89PNG"

    r = cli("select", "--profile", str(tmp_path / "p.json"), "--p", "0.2", "--out", str(tmp_path / "s.json"))
    assert r.returncode == 0, r.stderr
    sel = json.loads((tmp_path / "s.json").read_text())
    assert sel["shared_experts"] is False and set(sel["experts"]) == set(prof["layers"])

    r = cli("train", "--data", str(math_file), "--template", TEMPLATE, "--experts", str(tmp_path / "s.json"),
            "--steps", "4", "--batch-size", "2", "--out", str(tmp_path / "tr"))
    assert r.returncode == 0, r.stderr
    summary = json.loads((tmp_path / "tr" / "summary.json").read_text())
    assert summary["heldout_loss_before"] > 0 and summary["heldout_loss_after"] > 0
    assert len(summary["train_loss"]) == 4
    from safetensors import safe_open

    with safe_open(tmp_path / "tr" / "delta.safetensors", "pt") as f:
        keys = set(f.keys())
    assert keys == {f"layers.{l}.experts.{e}.{p}" for l, ids in sel["experts"].items() for e in ids
                    for p in ("gate_proj", "up_proj", "down_proj")}
    r = cli("delta", "inspect", str(tmp_path / "tr" / "delta.safetensors"))  # the wire format
    assert r.returncode == 0 and "codec: fp32" in r.stdout, r.stderr
    assert f"token_count: {summary['tokens']}" in r.stdout


def write_model_dir(path, config):
    path.mkdir()
    (path / "config.json").write_text(json.dumps(config))
    return path


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory, math_file):
    t = tmp_path_factory.mktemp("bad")
    (t / "empty.jsonl").write_text("")
    (t / "prof.json").write_text(json.dumps({"tokens": 10, "top_k": 4, "layers": {"0": {"counts": [1], "gate_sum": [1]}}}))
    (t / "bad_layer.json").write_text(json.dumps({"experts": {"9": [0]}, "shared_experts": False, "non_expert_modules": False}))
    (t / "bad_expert.json").write_text(json.dumps({"experts": {"0": [64]}, "shared_experts": False, "non_expert_modules": False}))
    (t / "corrupt.jsonl.gz").write_bytes(b"\x1f\x8b\x08\x00 this is not a gzip stream")
    (t / "corrupt.parquet").write_bytes(b"PAR1 truncated")
    write_model_dir(t / "dense", {"model_type": "llama", "hidden_size": 8})
    write_model_dir(t / "jamba", {"model_type": "jamba", "num_experts": 16})
    d, m = str(math_file), ["--template", TEMPLATE]
    return {
        "empty dataset": ["profile", "--data", str(t / "empty.jsonl"), "--out", str(t / "x")],
        "missing field": ["profile", "--data", d, "--text-field", "nosuchfield", "--out", str(t / "x")],
        "missing template key": ["profile", "--data", d, "--template", "{question} {nope}", "--out", str(t / "x")],
        "unreadable gzip": ["profile", "--data", str(t / "corrupt.jsonl.gz"), "--out", str(t / "x")],
        "unreadable parquet": ["profile", "--data", str(t / "corrupt.parquet"), "--out", str(t / "x")],
        "directory is not a dataset": ["profile", "--data", str(t), "--out", str(t / "x")],
        "p above 1": ["select", "--profile", str(t / "prof.json"), "--p", "1.5", "--out", str(t / "x")],
        "p zero": ["select", "--profile", str(t / "prof.json"), "--p", "0", "--out", str(t / "x")],
        "unknown layer": ["train", "--data", d, *m, "--experts", str(t / "bad_layer.json"), "--steps", "1", "--out", str(t / "o")],
        "unknown expert": ["train", "--data", d, *m, "--experts", str(t / "bad_expert.json"), "--steps", "1", "--out", str(t / "o")],
        "missing model dir": ["profile", "--model", str(t / "nowhere"), "--data", d, *m, "--out", str(t / "x")],
        "dense model": ["profile", "--model", str(t / "dense"), "--data", d, *m, "--out", str(t / "x")],
        "unsupported MoE": ["profile", "--model", str(t / "jamba"), "--data", d, *m, "--out", str(t / "x")],
    }


CASES = ["empty dataset", "missing field", "missing template key", "unreadable gzip", "unreadable parquet", "directory is not a dataset",
         "p above 1", "p zero", "unknown layer", "unknown expert", "missing model dir", "dense model", "unsupported MoE"]
EXPECT = {"empty dataset": "no non-empty records", "missing field": "nosuchfield", "missing template key": "nope",
          "unreadable gzip": "broken gzip", "unreadable parquet": "not a readable Parquet file", "directory is not a dataset": "save_to_disk", "p above 1": "--p",
          "p zero": "--p", "unknown layer": "layer 9", "unknown expert": "[64]", "missing model dir": "not found",
          "dense model": "not a Mixture-of-Experts", "unsupported MoE": "unsupported MoE architecture 'jamba'"}


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_one_line_and_exit_2(cli, bad_inputs, case):
    r = cli(*bad_inputs[case])
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr + r.stdout
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and EXPECT[case] in lines[0], r.stderr


def test_shipped_model_is_present():
    assert (DEFAULT_MODEL / "config.json").is_file() and (DEFAULT_MODEL / "model.safetensors").is_file()
