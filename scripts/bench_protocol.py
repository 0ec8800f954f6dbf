"""Protocol benchmark (not a test): loopback upload throughput and the codecs' compression.

  python scripts/bench_protocol.py [--delta DIR/delta.safetensors] [--size-mb 64] [--repeats 5]

Throughput: a real ValidatorServer on 127.0.0.1:0 and a real client; one SubmitDelta of --size-mb
MB (signed envelope, 1 MiB frames, server spools to disk and checks size and sha256). The backend
accepts without decoding, so this measures the transport. Median of --repeats; goal >= 200 MB/s.

Compression: every codec on an fp32 delta keyed by canonical expert names (what `expertmesh train`
writes). Without --delta it trains a real one first (40 ESFT steps on math with the shipped model).
"""
from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import safetensors.torch  # noqa: E402
import torch  # noqa: E402

from expertmesh.protocol import identity  # noqa: E402
from expertmesh.protocol.admission import AdmissionConfig  # noqa: E402
from expertmesh.protocol.backend import ValidatorBackend  # noqa: E402
from expertmesh.protocol.client import ClientConfig, ValidatorClient, sign_upload  # noqa: E402
from expertmesh.protocol.codec import CodecConfig, DeltaMeta, decode_delta, encode_delta  # noqa: E402
from expertmesh.protocol.experts import parse_expert_key  # noqa: E402
from expertmesh.protocol.server import ServerConfig, ValidatorServer  # noqa: E402
from expertmesh.protocol.types import Receipt  # noqa: E402

GOAL_MB_S = 200.0


class SinkBackend(ValidatorBackend):
    """Takes any verified payload without looking inside: the transport alone is measured."""

    def admit_delta(self, sub):
        return None

    def accept_delta(self, sub, payload):
        return Receipt(sub.digest, sub.envelope.round, payload.stat().st_size, "ok")

    def admit_dataset(self, sub):
        raise NotImplementedError

    accept_dataset = list_datasets = dataset_blob = manifest_blob = checkpoint_blob = admit_dataset

    def current_round(self):
        raise NotImplementedError

    status = current_round


def bench_throughput(size_mb: int, repeats: int) -> None:
    size = size_mb * 1_000_000
    key = identity.generate_key()
    with tempfile.TemporaryDirectory() as tmp:
        payload = Path(tmp) / "payload.bin"
        payload.write_bytes(os.urandom(size))
        limits = AdmissionConfig(max_payload_bytes={"delta": size + 1, "dataset": 1})
        cfg = ServerConfig(spool_dir=Path(tmp) / "spool", admission=limits)
        with ValidatorServer(SinkBackend(), cfg) as server, ValidatorClient(server.address, ClientConfig()) as client:
            upload_s, total_s = [], []
            for _ in range(repeats):
                t0 = time.perf_counter()
                env = sign_upload("delta", key, payload, model_version=1, model_sha256=bytes(32), round=1,
                                  domain="bench")
                t1 = time.perf_counter()
                receipt = client.submit_delta(payload, env, timeout_s=600)
                t2 = time.perf_counter()
                assert receipt.payload_bytes == size
                upload_s.append(t2 - t1)
                total_s.append(t2 - t0)
    up, tot = statistics.median(upload_s), statistics.median(total_s)
    print(f"\n== loopback SubmitDelta, {size_mb} MB payload, median of {repeats} "
          f"(load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs) ==")
    print(f"upload (stream + server spool + sha256 check): {size / up / 1e6:7.1f} MB/s  ({up:.3f} s; "
          f"runs {', '.join(f'{t:.3f}' for t in upload_s)})")
    print(f"sign + upload (client hashes the payload too):  {size / tot / 1e6:7.1f} MB/s  ({tot:.3f} s)")
    verdict = "met" if size / up / 1e6 >= GOAL_MB_S else "MISSED"
    print(f"goal >= {GOAL_MB_S:.0f} MB/s for the upload: {verdict}")


def train_real_delta(steps: int = 40) -> Path:
    """A real ESFT delta of the shipped model: profile, select and train on 1,000 GSM8K records."""
    import itertools
    import json
    import tempfile

    from expertmesh.node.domains import MATH_TEMPLATE
    from expertmesh.node.jobs import run_profile, run_select, run_train
    from expertmesh.node.data import read_records
    from expertmesh.node.paths import corpus

    tmp = Path(tempfile.mkdtemp(prefix="bench-delta-"))
    records = itertools.islice(read_records(corpus("gsm8k_train.jsonl")), 1000)
    (tmp / "math.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    run_profile(tmp / "math.jsonl", tmp / "profile.json", template=MATH_TEMPLATE, tokens=32_768)
    run_select(tmp / "profile.json", tmp / "experts.json")
    run_train(tmp / "math.jsonl", tmp / "experts.json", steps, tmp / "run", template=MATH_TEMPLATE, log_every=10**9)
    return tmp / "run" / "delta.safetensors"


def load_delta(path: Path) -> dict[str, torch.Tensor]:
    tensors = safetensors.torch.load_file(str(path))  # a local file we chose; still safetensors only
    bad = [k for k in tensors if not _is_canonical(k)]
    if bad:
        raise SystemExit(f"{path}: not a dense canonical delta (e.g. {bad[0]!r}); pass an fp32 delta from "
                         "`expertmesh train` or a codec=fp32 file")
    return {k: t.float() for k, t in tensors.items()}


def _is_canonical(key: str) -> bool:
    try:
        parse_expert_key(key)
        return True
    except ValueError:
        return False


def bench_codecs(delta: dict[str, torch.Tensor], source: str) -> None:
    n_params = sum(t.numel() for t in delta.values())
    shapes = {k: tuple(t.shape) for k, t in delta.items()}
    ref_norm = torch.sqrt(sum((t.double() ** 2).sum() for t in delta.values()))
    digest = hashlib.sha256(source.encode()).hexdigest()
    print(f"\n== codecs on {source}: {len(delta) // 3} experts, {n_params} parameters ==")
    print(f"{'codec':<24}{'bytes':>12}{'vs fp32':>9}{'vs fp16':>9}{'rel L2 err':>12}{'enc ms':>9}{'dec ms':>9}")
    for name, cfg in [("fp32", CodecConfig("fp32")), ("bf16", CodecConfig("bf16")),
                      ("int8 block 256", CodecConfig("int8", 256)), ("int8 block 64", CodecConfig("int8", 64)),
                      ("topk+int8 keep 0.10", CodecConfig("topk+int8", 256, 0.10)),
                      ("topk+int8 keep 0.05", CodecConfig("topk+int8", 256, 0.05))]:
        t0 = time.perf_counter()
        enc = encode_delta(delta, DeltaMeta(0, 0, digest), cfg)
        t1 = time.perf_counter()
        dec = decode_delta(enc.payload, shapes, max_bytes=len(enc.payload)).tensors
        t2 = time.perf_counter()
        err = torch.sqrt(sum(((dec[k] - delta[k]).double() ** 2).sum() for k in delta)) / ref_norm
        size = len(enc.payload)
        print(f"{name:<24}{size:>12}{n_params * 4 / size:>8.2f}x{n_params * 2 / size:>8.2f}x{err:>12.4f}"
              f"{(t1 - t0) * 1e3:>9.1f}{(t2 - t1) * 1e3:>9.1f}")


def bench_feedback(delta: dict[str, torch.Tensor], rounds: int = 8) -> None:
    """What error feedback buys: the error of the sum of R rounds, sending the same-sized delta each round."""
    cfg = CodecConfig("topk+int8", 256, 0.10)
    shapes = {k: tuple(t.shape) for k, t in delta.items()}
    residual, sent, true = None, {k: torch.zeros_like(t) for k, t in delta.items()}, None
    for r in range(rounds):
        d = delta if r == 0 else {k: t.roll(r, dims=1) for k, t in delta.items()}  # a different delta each round
        enc = encode_delta(d, DeltaMeta(0, 0, "0" * 64), cfg, residual)
        residual = enc.residual
        dec = decode_delta(enc.payload, shapes, max_bytes=len(enc.payload)).tensors
        sent = {k: sent[k] + dec[k] for k in sent}
        true = d if true is None else {k: true[k] + d[k] for k in true}
    err = torch.sqrt(sum(((sent[k] - true[k]).double() ** 2).sum() for k in true))
    ref = torch.sqrt(sum((t.double() ** 2).sum() for t in true.values()))
    print(f"topk+int8 keep 0.10 with error feedback: rel L2 error of the sum over {rounds} rounds {err / ref:.4f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--delta", type=Path, help="fp32 delta.safetensors written by `expertmesh train`")
    ap.add_argument("--size-mb", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(1)  # small per-expert tensors: threads only contend (and the host may be shared)
    bench_throughput(args.size_mb, args.repeats)
    source = args.delta
    if source is None:
        print("\nno --delta given: training one (40 ESFT steps on math with the shipped model)", flush=True)
        source = train_real_delta()
    delta = load_delta(source)
    bench_codecs(delta, f"a real delta ({source})")
    bench_feedback(delta)


if __name__ == "__main__":
    main()
