"""Delta codecs: accuracy, error feedback, strict decoding against the receiver's model, fuzzing."""
from __future__ import annotations

import json
import struct

import pytest
import safetensors.torch
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from expertmesh.kernels.reference import int8_blockwise_dequantize, int8_blockwise_quantize
from expertmesh.protocol.codec import CodecConfig, DeltaFormatError, DeltaMeta, DeltaSpec, decode_delta, encode_delta
from expertmesh.protocol.delta_format import METADATA_KEY

from protohelpers import SPEC, make_delta

META = DeltaMeta(model_version=3, token_count=12_345, data_digest="cd" * 32)
EXPERTS = {0: [1, 3], 1: [7]}


def encode(codec="int8", experts=EXPERTS, **kw):
    return encode_delta(make_delta(experts), META, CodecConfig(codec, **kw))


def rebuild(payload: bytes, edit) -> bytes:
    """Re-pack a payload after edit(tensors, header_dict) changed it: a well-formed file that lies."""
    n = struct.unpack("<Q", payload[:8])[0]
    header = json.loads(json.loads(payload[8:8 + n])["__metadata__"][METADATA_KEY])
    tensors = dict(safetensors.torch.load(payload))
    edit(tensors, header)
    return safetensors.torch.save(tensors, metadata={METADATA_KEY: json.dumps(header)})


@pytest.mark.parametrize("codec", ["fp32", "bf16", "int8", "topk+int8"])
def test_round_trip_and_header(codec):
    delta = make_delta(EXPERTS)
    enc = encode_delta(delta, META, CodecConfig(codec, block=64, keep_fraction=0.25))
    dec = decode_delta(enc.payload, SPEC)
    assert dec.header == enc.header and dec.header.experts.layers() == {0: (1, 3), 1: (7,)}
    assert dec.header.token_count == 12_345 and dec.header.model_version == 3
    assert dec.tensors.keys() == delta.keys()
    for k, x in delta.items():
        y = dec.tensors[k]
        assert y.dtype == torch.float32 and y.shape == x.shape
        # what was not sent is exactly what the sender keeps for next round
        torch.testing.assert_close(y + enc.residual.get(k, torch.zeros_like(x)), x, rtol=0, atol=1e-9)
    if codec == "fp32":
        assert all(torch.equal(dec.tensors[k], delta[k]) for k in delta) and enc.residual == {}


def test_int8_error_per_block():
    """On Gaussian deltas of the tiny model's shapes: worst block within 1% of its absmax, mean L2 within 1%."""
    spec = DeltaSpec(4, 64, hidden=128, intermediate=64)
    delta = make_delta({0: [0, 5], 3: [63]}, spec=spec)
    dec = decode_delta(encode_delta(delta, META, CodecConfig("int8", block=256)).payload, spec).tensors
    err_B = torch.cat([(dec[k] - delta[k]).flatten() for k in delta]).view(-1, 256)
    ref_B = torch.cat([delta[k].flatten() for k in delta]).view(-1, 256)
    assert (err_B.abs().amax(1) / ref_B.abs().amax(1)).max() <= 0.01
    assert (err_B.norm(dim=1) / ref_B.norm(dim=1)).mean() <= 0.01


@settings(max_examples=100, deadline=None)
@given(st.lists(st.floats(-1e6, 1e6, allow_nan=False, width=32), min_size=1, max_size=600),
       st.sampled_from([16, 64, 256]))
def test_int8_bound_holds_for_any_block(values, block):
    """Per block, |error| <= absmax/254 (half a step): under 1% of the block's largest entry, always."""
    x = torch.tensor(values)
    q, s = int8_blockwise_quantize(x, block)
    y = int8_blockwise_dequantize(q, s, tuple(x.shape))
    pad = (-len(values)) % block
    err_B = torch.nn.functional.pad(y - x, (0, pad)).view(-1, block).abs().amax(1)
    absmax_B = torch.nn.functional.pad(x, (0, pad)).view(-1, block).abs().amax(1)
    assert (err_B <= absmax_B / 254 * (1 + 1e-5) + 1e-30).all()


def test_topk_error_feedback_delays_but_never_loses():
    cfg = CodecConfig("topk+int8", block=64, keep_fraction=0.1)
    assert cfg.keep == 6
    residual, sent_total, true_total = None, None, None
    for rnd in range(6):
        delta = make_delta(EXPERTS, seed=rnd)
        enc = encode_delta(delta, META, cfg, residual)
        dec = decode_delta(enc.payload, SPEC).tensors
        for k in delta:  # at most `keep` entries per block are sent
            assert (dec[k] != 0).sum() <= cfg.keep * -(-delta[k].numel() // 64)
        sent_total = dec if sent_total is None else {k: sent_total[k] + dec[k] for k in dec}
        true_total = delta if true_total is None else {k: true_total[k] + delta[k] for k in delta}
        residual = enc.residual
    for k in true_total:  # sum of everything sent + what is still pending == sum of all true deltas
        torch.testing.assert_close(sent_total[k] + residual[k], true_total[k], rtol=0, atol=1e-7)
    # and feedback helps: error of the sum is well below the error of a single round's top-k
    single = decode_delta(encode_delta(make_delta(EXPERTS, seed=9), META, cfg).payload, SPEC).tensors
    one_err = sum((single[k] - make_delta(EXPERTS, seed=9)[k]).norm() ** 2 for k in single) ** 0.5
    one_norm = sum(v.norm() ** 2 for v in make_delta(EXPERTS, seed=9).values()) ** 0.5
    sum_err = sum(residual[k].norm() ** 2 for k in residual) ** 0.5
    sum_norm = sum(v.norm() ** 2 for v in true_total.values()) ** 0.5
    assert sum_err / sum_norm < one_err / one_norm


def test_residual_of_experts_not_sent_is_kept():
    enc = encode_delta(make_delta({0: [1]}), META, CodecConfig("int8"), residual={"layers.1.experts.2.up_proj": torch.ones(16, 32)})
    assert torch.equal(enc.residual["layers.1.experts.2.up_proj"], torch.ones(16, 32))


def test_expected_shapes_as_a_map():
    delta = make_delta({0: [1]})
    payload = encode_delta(delta, META, CodecConfig("bf16")).payload
    shapes = {k: tuple(v.shape) for k, v in delta.items()}
    assert decode_delta(payload, shapes).tensors.keys() == delta.keys()
    with pytest.raises(DeltaFormatError, match="not an expert of the receiver"):
        decode_delta(payload, {k: s for k, s in shapes.items() if "down" not in k})


def _set(name, fn):
    def edit(t, h):
        t[name] = fn(t[name])
    return edit


K0 = "layers.0.experts.1.gate_proj"


def esft(layers):
    return {"experts": layers, "shared_experts": False, "non_expert_modules": False}
BAD = [
    ("int8", lambda t, h: h.update(experts=esft({"0": [1, 3]})), "do not match the declared experts"),
    ("int8", lambda t, h: [t.pop(k) for k in list(t) if k.startswith("layers.1.experts.7.down_proj")],
     "do not match the declared experts"),
    ("int8", lambda t, h: t.update({"layers.0.experts.1.gate_proj.extra": torch.zeros(1)}), "not a canonical"),
    ("int8", lambda t, h: t.update({K0: torch.zeros(16, 32)}), "not a part of codec"),
    ("int8", lambda t, h: t.update({"other.weight": torch.zeros(1)}), "not a canonical expert tensor name"),
    ("int8", _set(K0 + ".scale", lambda s: s.double()), "expected F32"),
    ("int8", _set(K0 + ".q", lambda q: q[:-1]), "expected I8"),
    ("int8", _set(K0 + ".scale", lambda s: torch.full_like(s, float("inf"))), "finite"),
    ("int8", _set(K0 + ".scale", lambda s: -s), ">= 0"),
    ("int8", _set(K0 + ".scale", lambda s: torch.full_like(s, 3e38)), "decodes to NaN or inf"),
    ("fp32", _set(K0, lambda x: x.index_fill(0, torch.tensor([0]), float("nan"))), "NaN or inf"),
    ("topk+int8", _set(K0 + ".idx", lambda i: i.flip(1)), "strictly increasing"),
    ("topk+int8", _set(K0 + ".idx", lambda i: i + 300), "strictly increasing positions within"),
    ("int8", lambda t, h: h.update(codec="lz4"), "codec"),
    ("int8", lambda t, h: h.update(block=7), "block"),
    ("int8", lambda t, h: h.update(hidden=33), "expected I8"),
    ("int8", lambda t, h: h.update(token_count=-1), "token_count"),
    ("int8", lambda t, h: h.update(data_digest="xyz"), "data_digest"),
    ("int8", lambda t, h: h.update(extra=1), "exactly the fields"),
    ("int8", lambda t, h: h.update(format="expertmesh-delta/1"), "format"),
    ("int8", lambda t, h: h.update(experts=esft({"0": [3, 1], "1": [7]})), "strictly increasing list"),
    ("int8", lambda t, h: h.update(experts={"0": [1, 3], "1": [7]}), "shared_experts"),
    ("int8", lambda t, h: h.update(experts={**esft({"0": [1, 3], "1": [7]}), "shared_experts": True}), "shared_experts"),
]


@pytest.mark.parametrize("codec, edit, fragment", BAD, ids=[f"{i}-{b[2][:24]}" for i, b in enumerate(BAD)])
def test_decoder_refuses(codec, edit, fragment):
    payload = rebuild(encode(codec, block=64).payload, edit)
    with pytest.raises(DeltaFormatError, match=fragment.replace("(", r"\(")):
        decode_delta(payload, SPEC)


def test_decoder_refuses_other_models_and_sizes():
    payload = encode("int8").payload
    with pytest.raises(DeltaFormatError, match="shape"):
        decode_delta(payload, DeltaSpec(2, 8, hidden=64, intermediate=16))
    with pytest.raises(DeltaFormatError, match="not an expert of the receiver"):
        decode_delta(payload, DeltaSpec(1, 8, 32, 16))  # layer 1 does not exist there
    with pytest.raises(DeltaFormatError, match="exceeds the limit"):
        decode_delta(payload, SPEC, max_bytes=len(payload) - 1)
    with pytest.raises(DeltaFormatError, match="no 'expertmesh' header"):
        decode_delta(safetensors.torch.save({K0: torch.zeros(16, 32)}), SPEC)
    with pytest.raises(DeltaFormatError, match="not JSON"):
        decode_delta(struct.pack("<Q", 4) + b"[[[[" + b"\0" * 8, SPEC)


def test_encoder_refuses_sender_mistakes():
    delta = make_delta({0: [1]})
    with pytest.raises(ValueError, match="all of gate_proj"):
        encode_delta({k: v for k, v in delta.items() if "up" not in k}, META)
    with pytest.raises(ValueError, match="NaN"):
        encode_delta({**delta, K0: torch.full((16, 32), float("nan"))}, META)
    with pytest.raises(ValueError, match="inconsistent expert shapes"):
        encode_delta({**delta, K0: torch.zeros(8, 32)}, META)
    with pytest.raises(ValueError, match="keep_fraction"):
        CodecConfig("topk+int8", keep_fraction=0)


VALID = {c: encode(c, block=16, experts={0: [1]}).payload for c in ["fp32", "bf16", "int8", "topk+int8"]}


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(sorted(VALID)), st.integers(0, 1 << 16), st.binary(min_size=1, max_size=16),
       st.booleans(), st.booleans())
def test_decoder_fuzz_only_format_errors(codec, pos, patch, truncate, in_header):
    payload = VALID[codec]
    pos %= (8 + struct.unpack("<Q", payload[:8])[0]) if in_header else len(payload)
    mutated = payload[:pos] if truncate else payload[:pos] + patch + payload[pos + len(patch):]
    try:
        out = decode_delta(mutated, SPEC)
    except DeltaFormatError:
        return
    assert all(torch.isfinite(t).all() for t in out.tensors.values())


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=2000))
def test_decoder_fuzz_random_bytes(data):
    with pytest.raises(DeltaFormatError):
        decode_delta(data, SPEC)
